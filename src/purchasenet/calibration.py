"""Temperature scaling and the decision threshold, both fitted on the validation split.

After training, the best checkpoint's validation logits give a temperature that makes its
probabilities honest and, for binary tasks, the purchase probability at which to say "buys".
Both are written into the checkpoint, so every prediction (``PurchaseModel``, the server)
applies them. Nothing here imports Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from purchasenet.datasets import TARGET
from purchasenet.errors import ConfigError
from purchasenet.inference import BUNDLE_KEY

THRESHOLD_OBJECTIVES = ("f1", "accuracy", "balanced_accuracy")
ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, task: str) -> float:
    """The temperature T that minimises the negative log-likelihood of ``logits / T``.

    Dividing by one positive number keeps the ranking (ROC-AUC, PR-AUC) and only sharpens or
    softens the probabilities; T stays within ``TEMPERATURE_RANGE`` for separable data.
    """
    logits = logits.detach().to(torch.float64)
    if task == "binary":
        logits, targets = logits.reshape(-1), targets.detach().to(torch.float64).reshape(-1)
    else:
        targets = targets.detach().to(torch.int64)
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_temperature], lr=0.5, max_iter=200, line_search_fn="strong_wolfe"
    )

    def negative_log_likelihood() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = logits / log_temperature.exp()
        if task == "binary":
            loss = F.binary_cross_entropy_with_logits(scaled, targets)
        else:
            loss = F.cross_entropy(scaled, targets)
        loss.backward()
        return loss

    optimizer.step(negative_log_likelihood)
    low, high = TEMPERATURE_RANGE
    return float(np.clip(log_temperature.exp().item(), low, high))


def best_f1(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """The highest F1 any threshold reaches on these rows."""
    order = np.argsort(-probabilities, kind="stable")
    true_positives = np.cumsum(targets[order])
    predicted_positive = np.arange(1, len(order) + 1)
    positives = targets.sum()
    if positives == 0:
        return 0.0
    return float(np.max(2 * true_positives / (predicted_positive + positives)))


def choose_threshold(probabilities: np.ndarray, targets: np.ndarray, objective: str) -> float:
    """The decision threshold on calibrated purchase probabilities that serves ``objective``.

    f1: half the best F1 reached on these rows, which is where the F1-optimal threshold of
    calibrated probabilities lies; on a few hundred purchases this is steadier than the
    arg-max of a jagged F1 curve. accuracy: 0.5. balanced_accuracy: the share of purchases.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if objective == "f1":
        return best_f1(probabilities, targets) / 2
    if objective == "accuracy":
        return 0.5
    check_objective(objective)
    return float(targets.mean())


def check_objective(objective: str) -> None:
    if objective not in THRESHOLD_OBJECTIVES:
        raise ConfigError(
            f"calibration.threshold_objective must be one of {', '.join(THRESHOLD_OBJECTIVES)} "
            f"or null; got {objective!r}"
        )


@torch.no_grad()
def split_logits(model: torch.nn.Module, datamodule, split: str) -> tuple[torch.Tensor, ...]:
    """Logits and targets of every row of one split, from the model in evaluation mode.

    Read from the split itself rather than the loaders, which under several processes give
    each process only its share: every process must fit the same temperature and threshold.
    """
    frame = getattr(datamodule.splits, split)
    inputs = torch.from_numpy(datamodule.encoder.transform(frame))
    model.eval()
    logits = model(inputs.to(model.device)).cpu()
    return logits, torch.tensor(frame[TARGET].to_numpy(dtype=np.int64))


def calibrate(
    model,
    datamodule,
    checkpoint_path: str | Path,
    settings: Mapping[str, Any],
    write: bool = True,
) -> dict[str, float]:
    """Fit temperature and threshold for the checkpoint's weights and store them in it.

    ``settings`` holds ``temperature`` (fit one or keep 1) and ``threshold_objective``
    (binary tasks; null keeps 0.5). The model scores and decides with them afterwards.
    """
    objective = settings.get("threshold_objective")
    if objective is not None:
        check_objective(objective)

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    logits, targets = split_logits(model, datamodule, "val")

    temperature = 1.0
    if settings.get("temperature", True):
        temperature = fit_temperature(logits, targets, model.task)
    threshold = 0.5
    if model.task == "binary" and objective is not None:
        probabilities = torch.sigmoid(logits.reshape(-1) / temperature).numpy()
        threshold = choose_threshold(probabilities, targets.numpy(), objective)

    model.use_calibration(temperature, threshold)
    if write:
        update_bundle(checkpoint_path, temperature=temperature, threshold=threshold)
    return {"calibration/temperature": temperature, "calibration/threshold": threshold}


def update_bundle(checkpoint_path: str | Path, **values: Any) -> None:
    """Set plain-data ``values`` in a checkpoint's bundle, replacing the file atomically."""
    path = Path(checkpoint_path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint[BUNDLE_KEY].update(values)
    partial = path.with_name(path.name + ".partial")
    torch.save(checkpoint, partial)
    os.replace(partial, path)


def reliability_bins(
    probabilities: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """Mean predicted probability, observed frequency and row count in equal-width bins.

    Binary: the purchase probability against the purchase rate. Multiclass (one row of
    class probabilities per sample): the top probability against how often that class is right.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets)
    if probabilities.ndim == 2:
        hits = (probabilities.argmax(axis=1) == targets).astype(np.float64)
        probabilities = probabilities.max(axis=1)
    else:
        hits = targets.astype(np.float64)
    bins = np.minimum((probabilities * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    filled = np.maximum(counts, 1.0)
    return {
        "confidence": np.bincount(bins, probabilities, minlength=n_bins) / filled,
        "frequency": np.bincount(bins, hits, minlength=n_bins) / filled,
        "count": counts,
    }


def reliability_figure(probabilities: np.ndarray, targets: np.ndarray, title: str):
    """A reliability diagram: observed frequency against predicted probability per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = reliability_bins(probabilities, targets)
    filled = bins["count"] > 0
    binary = np.asarray(probabilities).ndim == 1
    figure, (curve, histogram) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    curve.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    curve.plot(bins["confidence"][filled], bins["frequency"][filled], marker="o", label="model")
    curve.set_ylabel("observed purchase rate" if binary else "observed accuracy")
    curve.set_title(title)
    curve.legend(loc="upper left")
    edges = np.linspace(0, 1, ECE_BINS + 1)
    histogram.bar(edges[:-1], bins["count"], width=1 / ECE_BINS, align="edge", color="tab:blue")
    histogram.set_yscale("log")
    histogram.set_ylabel("rows")
    histogram.set_xlabel("predicted purchase probability" if binary else "top class probability")
    figure.tight_layout()
    return figure


def log_reliability_diagram(model, datamodule, loggers: Iterable[Any], step: int) -> None:
    """Add the test split's reliability diagram to every logger that takes figures."""
    takers = [
        logger
        for logger in loggers
        if hasattr(getattr(logger, "experiment", None), "add_figure")
    ]
    if not takers:
        return
    logits, targets = split_logits(model, datamodule, "test")
    probabilities = model.scores(logits).numpy()
    title = f"{datamodule.name}: test split, temperature {model.temperature:.2f}"
    figure = reliability_figure(probabilities, targets.numpy(), title)
    for logger in takers:
        logger.experiment.add_figure("figures/reliability_diagram/test", figure, global_step=step)
    import matplotlib.pyplot as plt

    plt.close(figure)
