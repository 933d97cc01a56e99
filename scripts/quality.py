"""Measure the default models: the shopper model over several seeds beside LightGBM and
logistic regression on the same split, and every synthetic data set against its ceiling.

    python scripts/quality.py                     # 5 seeds, writes reports/quality/
    python scripts/quality.py --seeds 2 --output-dir /tmp/quality

Needs the benchmark extra: pip install -e '.[bench]' (make quality installs it).
"""

import argparse
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per model")
    parser.add_argument("--first-seed", type=int, default=42, help="the first seed (default 42)")
    parser.add_argument("--output-dir", type=Path, default=Path("reports/quality"),
                        help="where quality.md, quality.png and the runs go")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")

    from purchasenet.errors import UserError
    from purchasenet.quality import report

    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    try:
        text = report(CONFIG_DIR, args.output_dir, seeds, lambda line: print(line, flush=True))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
