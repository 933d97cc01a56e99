"""Compare finished runs: writes comparison.md and comparison.png and prints the table.

    python scripts/compare.py logs/multirun/2025-01-31_10-00-00        # the runs of a sweep
    python scripts/compare.py logs/run-a logs/run-b --output reports/  # any runs
"""

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a run's log folder, its summary.json, or a folder of runs")
    parser.add_argument("--output", metavar="DIR",
                        help="where to write the report (default: the folder given, if one, "
                        "else the working directory)")
    args = parser.parse_args()

    from purchasenet.errors import UserError
    from purchasenet.reports import find_summaries, write_report

    single_folder = len(args.paths) == 1 and Path(args.paths[0]).is_dir()
    output = Path(args.output or (args.paths[0] if single_folder else "."))
    try:
        summaries = find_summaries(args.paths)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table, picture = write_report(summaries, output)
    print(table.read_text())
    print(f"Wrote {table} and {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
