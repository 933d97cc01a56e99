"""Comparison reports over finished runs: a markdown table and one figure of their curves.

Each run writes ``summary.json`` into its log folder and, inside a Hydra job, into the job's
folder too (see :class:`purchasenet.callbacks.RunSummary`). A report reads only those files, so
it can be rebuilt at any time with ``scripts/compare.py``; when a multirun ends,
:class:`ComparisonReport` writes one into the multirun's folder.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from purchasenet.errors import UserError

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
TABLE_FILE = "comparison.md"
FIGURE_FILE = "comparison.png"
FIRST_LAYER, LAST_LAYER = "grad_norm/hidden_1", "grad_norm/output"


def write_summary(summary: Mapping[str, Any], folders: Iterable[str | Path]) -> None:
    text = json.dumps(summary, indent=2)
    for folder in folders:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / SUMMARY_FILE).write_text(text)


def _path_order(path: Path) -> tuple:
    # Job folders of a multirun are numbered: 10 sorts after 9.
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def find_summaries(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The run summaries in ``paths`` (summary files, run folders or folders of runs), each once."""
    summaries: dict[str, dict[str, Any]] = {}
    for path in map(Path, paths):
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(path.rglob(SUMMARY_FILE), key=_path_order)
        else:
            raise UserError(f"{path}: no such file or folder")
        for file in files:
            try:
                summary = json.loads(file.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise UserError(f"{file}: not a readable run summary ({error})") from None
            summaries.setdefault(summary.get("run_name") or str(file), summary)
    if not summaries:
        shown = ", ".join(str(path) for path in paths)
        raise UserError(f"no {SUMMARY_FILE} found under {shown}; train runs there first")
    return list(summaries.values())


def best(history: Sequence[Mapping[str, float]], key: str, lowest: bool = False):
    """(value, epoch) of the best value of ``key`` over the epochs, or (None, None)."""
    scored = [(record[key], record["epoch"]) for record in history if key in record]
    if not scored:
        return None, None
    return (min if lowest else max)(scored, key=lambda pair: pair[0])


def final(history: Sequence[Mapping[str, float]], key: str) -> float | None:
    values = [record[key] for record in history if key in record]
    return values[-1] if values else None


def gradient_ratio(history: Sequence[Mapping[str, float]]) -> float | None:
    """Mean gradient norm of the first hidden layer over that of the output layer."""
    pairs = [(record[FIRST_LAYER], record[LAST_LAYER]) for record in history
             if FIRST_LAYER in record and LAST_LAYER in record]
    if not pairs:
        return None
    first = sum(pair[0] for pair in pairs) / len(pairs)
    last = sum(pair[1] for pair in pairs) / len(pairs)
    return first / last if last > 0 else math.inf


def _short(value: str) -> str:
    """A sampled number such as 0.0006533369619026638 as 0.0006533; anything else unchanged."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if len(value) > 8 and "." in value else value


def split_overrides(summaries: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The overrides every run shares, and per run the ones that set it apart."""
    parsed = [{key: _short(value) for key, _, value in
               (item.partition("=") for item in s.get("overrides", []) if "=" in item)}
              for s in summaries]
    keys = list(dict.fromkeys(key for overrides in parsed for key in overrides))
    varying = {key for key in keys if len({o.get(key) for o in parsed}) > 1}
    common = [f"{key}={parsed[0][key]}" for key in keys if key not in varying]
    own = [[f"{key}={o[key]}" for key in keys if key in varying and key in o] for o in parsed]
    return common, own


def run_labels(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    _, own = split_overrides(summaries)
    labels = [" ".join(items) or s["run_name"] for items, s in zip(own, summaries)]
    if len(set(labels)) < len(labels):
        labels = [s["run_name"] for s in summaries]
    return labels


def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def comparison_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """A markdown report: one row per run, with the settings that differ between runs."""
    common, _ = split_overrides(summaries)
    labels = run_labels(summaries)
    test_keys = sorted({key for s in summaries for key in s.get("test", {})},
                       key=lambda key: (key not in ("test/acc", "test/loss"), key))
    header = ["run", "epochs", "best val/acc (epoch)", "best val/loss", "final val/acc",
              "final val/loss", *test_keys, "fit time", "grad first/last"]
    rows = []
    for label, summary in zip(labels, summaries):
        history = summary.get("history", [])
        best_acc, best_epoch = best(history, "val/acc")
        best_loss, _ = best(history, "val/loss", lowest=True)
        acc_text = _number(best_acc) + (f" ({int(best_epoch) + 1})" if best_epoch is not None
                                        else "")
        rows.append([
            label,
            str(summary.get("epochs", len(history))),
            acc_text,
            _number(best_loss),
            _number(final(history, "val/acc")),
            _number(final(history, "val/loss")),
            *(_number(summary.get("test", {}).get(key)) for key in test_keys),
            f"{summary.get('fit_seconds', 0.0):.1f} s",
            _number(gradient_ratio(history), digits=3),
        ])

    lines = [f"# Comparison of {len(summaries)} runs", ""]
    if common:
        lines += ["Shared settings: `" + " ".join(common) + "`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    ceilings = {s.get("dataset"): s.get("bayes_accuracy") for s in summaries}
    lines.append("")
    lines += [f"Best possible accuracy on {name}: {value:.3f}."
              for name, value in ceilings.items() if value is not None]
    lines += [
        "Test metrics are those of each run's best checkpoint (lowest val/loss). "
        "grad first/last: mean gradient norm of the first hidden layer over the output "
        "layer's; far below 1, the gradient vanishes before it reaches the first layer.",
        "",
        "Runs:",
        *(f"- {label}: `{s['run_name']}` (logs: `{s.get('log_dir', '')}`)"
          for label, s in zip(labels, summaries)),
        "",
    ]
    return "\n".join(lines)


def comparison_figure(summaries: Sequence[Mapping[str, Any]]):
    """Validation curves of every run, their test metrics, and the first layer's gradient."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from purchasenet.figures import colour

    labels = run_labels(summaries)
    with_gradients = any(FIRST_LAYER in r for s in summaries for r in s.get("history", []))
    panels = 4 if with_gradients else 3
    figure = Figure(figsize=(4.6 * panels, 4.4), dpi=100)
    axes = figure.subplots(1, panels)

    for index, (label, summary) in enumerate(zip(labels, summaries)):
        history = summary.get("history", [])
        for panel, key in ((0, "val/acc"), (1, "val/loss"), (3, FIRST_LAYER)):
            if panel >= panels:
                continue
            points = [(r["epoch"] + 1, r[key]) for r in history if key in r]
            if points:
                axes[panel].plot(*zip(*points), color=colour(index), label=label, linewidth=1.6)
    axes[0].set_title("validation accuracy")
    axes[1].set_title("validation loss")
    for panel in [0, 1, 3][: panels - 1]:
        axes[panel].set_xlabel("epoch")
        axes[panel].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=7)
    if with_gradients:
        axes[3].set_yscale("log")
        axes[3].set_title("first hidden layer's gradient norm")

    test_keys = [key for key in ("test/acc", "test/auroc", "test/f1", "test/f1_macro")
                 if any(key in s.get("test", {}) for s in summaries)]
    width = 0.8 / max(len(test_keys), 1)
    for offset, key in enumerate(test_keys):
        values = [s.get("test", {}).get(key, 0.0) for s in summaries]
        positions = [index + offset * width for index in range(len(summaries))]
        bars = axes[2].bar(positions, values, width=width, label=key,
                           color=colour(offset + 2), alpha=0.85)
        axes[2].bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ceilings = {s.get("bayes_accuracy") for s in summaries} - {None}
    for ceiling in ceilings:
        axes[2].axhline(ceiling, color="black", linestyle="--", linewidth=1,
                        label="best possible accuracy")
    axes[2].set_xticks([index + width * (len(test_keys) - 1) / 2 for index in range(len(labels))],
                       labels, rotation=25, ha="right", fontsize=7)
    axes[2].set_ylim(0, 1.3)
    axes[2].set_title("test metrics (best checkpoint)")
    if test_keys:
        axes[2].legend(fontsize=7, loc="upper left", ncol=2)
    figure.tight_layout()
    return figure


def write_report(summaries: Sequence[Mapping[str, Any]], folder: str | Path) -> tuple[Path, Path]:
    """Write comparison.md and comparison.png into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table, picture = folder / TABLE_FILE, folder / FIGURE_FILE
    table.write_text(comparison_table(summaries))
    comparison_figure(summaries).savefig(picture)
    return table, picture


class ComparisonReport(Callback):
    """A Hydra callback: when a multirun ends, compare its runs inside the multirun's folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            summaries = find_summaries([sweep_dir])
        except UserError as error:
            log.warning("No comparison report: %s", error)
            return
        table, picture = write_report(summaries, sweep_dir)
        print(f"\n{table.read_text()}\nComparison of {len(summaries)} runs: {table} and "
              f"{picture}", flush=True)
