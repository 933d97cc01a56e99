"""Figures of what a classifier learned, drawn with matplotlib's object API (no display needed).

Each drawing takes ``predict_proba(columns) -> probabilities``, so it serves a model in training
and one loaded from a checkpoint alike. Binary models return the purchase probability per row,
multiclass models one probability per class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from purchasenet.datasets import TARGET

ScoreColumns = Callable[[Mapping[str, np.ndarray]], np.ndarray]

CLASS_COLOURS = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb"]


def colour(index: int) -> str:
    return CLASS_COLOURS[index % len(CLASS_COLOURS)]


def _padded_range(values: np.ndarray, share: float = 0.05) -> tuple[float, float]:
    low, high = float(np.min(values)), float(np.max(values))
    margin = (high - low) * share or 1.0
    return low - margin, high + margin


def _sample(frame: pd.DataFrame, max_points: int) -> pd.DataFrame:
    if len(frame) <= max_points:
        return frame
    return frame.sample(max_points, random_state=0)


def decision_boundary(
    predict_proba: ScoreColumns,
    frame: pd.DataFrame,
    features: Sequence[str],
    class_names: Sequence[str],
    max_points: int = 400,
    resolution: int = 150,
) -> Figure:
    """The model's answer over the plane of two numeric features, with labelled rows on top."""
    first, second = features
    xs = np.linspace(*_padded_range(frame[first].to_numpy()), resolution)
    ys = np.linspace(*_padded_range(frame[second].to_numpy()), resolution)
    grid_x, grid_y = np.meshgrid(xs, ys)
    probabilities = predict_proba({first: grid_x.ravel(), second: grid_y.ravel()})

    figure = Figure(figsize=(6.0, 4.8), dpi=100)
    axes = figure.add_subplot()
    if probabilities.ndim == 1:
        surface = probabilities.reshape(grid_x.shape)
        filled = axes.contourf(grid_x, grid_y, surface, levels=np.linspace(0, 1, 11),
                               cmap="RdBu_r", alpha=0.55)
        axes.contour(grid_x, grid_y, surface, levels=[0.5], colors="black", linewidths=1.2)
        figure.colorbar(filled, ax=axes, label=f"P({class_names[-1]})")
    else:
        decisions = probabilities.argmax(axis=1).reshape(grid_x.shape)
        palette = [colour(index) for index in range(len(class_names))]
        axes.contourf(grid_x, grid_y, decisions, levels=np.arange(len(class_names) + 1) - 0.5,
                      colors=palette, alpha=0.3)

    shown = _sample(frame, max_points)
    for index, name in enumerate(class_names):
        rows = shown[shown[TARGET] == index]
        axes.scatter(rows[first], rows[second], s=10, color=colour(index), edgecolors="black",
                     linewidths=0.3, label=name)
    axes.set_xlabel(first)
    axes.set_ylabel(second)
    axes.set_title("Decision boundary")
    axes.legend(loc="upper right", fontsize=7, framealpha=0.8)
    return figure


def probability_curve(
    predict_proba: ScoreColumns,
    frame: pd.DataFrame,
    feature: str,
    class_names: Sequence[str],
    bins: int = 24,
) -> Figure:
    """Predicted probability over one numeric feature, against the share observed in ``frame``."""
    values = frame[feature].to_numpy()
    xs = np.linspace(float(values.min()), float(values.max()), 400)
    probabilities = predict_proba({feature: xs})
    if probabilities.ndim == 1:
        probabilities = np.stack([1.0 - probabilities, probabilities], axis=1)
    shown = range(1, 2) if len(class_names) == 2 else range(len(class_names))

    edges = np.linspace(xs[0], xs[-1], bins + 1)
    bin_of_row = np.clip(np.digitize(values, edges) - 1, 0, bins - 1)
    centres = (edges[:-1] + edges[1:]) / 2

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    for index in shown:
        axes.plot(xs, probabilities[:, index], color=colour(index), linewidth=2,
                  label=f"predicted P({class_names[index]})")
        targets = frame[TARGET].to_numpy() == index
        counts = np.bincount(bin_of_row, minlength=bins)
        hits = np.bincount(bin_of_row, weights=targets, minlength=bins)
        enough = counts >= 5
        axes.scatter(centres[enough], hits[enough] / counts[enough], color=colour(index),
                     marker="o", s=18, alpha=0.6, label=f"observed share ({class_names[index]})")
    axes.set_ylim(-0.03, 1.03)
    axes.set_xlabel(feature)
    axes.set_ylabel("probability")
    axes.set_title("Predicted probability")
    axes.legend(loc="best", fontsize=7)
    return figure


def confusion_matrix(
    targets: np.ndarray, decisions: np.ndarray, class_names: Sequence[str]
) -> Figure:
    """Counts of true against predicted class, shaded by the share of each true class."""
    size = len(class_names)
    counts = np.zeros((size, size), dtype=np.int64)
    np.add.at(counts, (targets.astype(np.int64), decisions.astype(np.int64)), 1)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)

    figure = Figure(figsize=(5.6, 4.8), dpi=100)
    axes = figure.add_subplot()
    axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for true in range(size):
        for predicted in range(size):
            axes.text(predicted, true, f"{counts[true, predicted]:,}", ha="center", va="center",
                      color="white" if shares[true, predicted] > 0.5 else "black", fontsize=8)
    axes.set_xticks(range(size), class_names, rotation=30, ha="right", fontsize=7)
    axes.set_yticks(range(size), class_names, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    axes.set_title(f"Confusion matrix (accuracy {accuracy:.3f})")
    figure.tight_layout()
    return figure


def to_image(figure: Figure) -> np.ndarray:
    """The figure as an RGB array of shape (height, width, 3)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
