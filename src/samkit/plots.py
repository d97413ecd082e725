"""Figures for the experiment reports (matplotlib, drawn off-screen with the Agg canvas).

matplotlib is imported inside the functions, and no global backend is set: importing samkit
never touches a display, and a figure can be written on a headless machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samkit.train.checkpoint import atomic_write

METRIC_LABELS = {
    "test_acc": "test accuracy",
    "train_acc": "train accuracy",
    "train_loss": "train loss",
    "test_loss": "test loss",
}


def plain_log_axis(axis) -> None:
    """Label a log-scaled ``axis`` with plain numbers (``0.9``, ``2``, ``1000``), not
    ``9×10⁻¹``; matplotlib still decides which ticks get a label (no crowding)."""
    from matplotlib.ticker import LogFormatterSciNotation

    class Plain(LogFormatterSciNotation):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def curve(runs: Sequence[Sequence[Mapping[str, Any]]], metric: str) -> tuple[np.ndarray, ...]:
    """Epochs, mean and standard deviation of ``metric`` over runs (epoch records only).

    Epochs missing in some runs (a run still going) are averaged over the runs that have them;
    a null or non-finite value (a diverged run) is left out.
    """
    by_epoch: dict[int, list[float]] = {}
    for records in runs:
        for r in records:
            value = r.get(metric)
            if r.get("event", "epoch") != "epoch" or not isinstance(value, (int, float)):
                continue  # strict JSON: a missing or non-finite value is null
            if np.isfinite(value):
                by_epoch.setdefault(int(r["epoch"]), []).append(float(value))
    epochs = np.array(sorted(by_epoch), dtype=float)
    values = [np.array(by_epoch[int(e)]) for e in epochs]
    mean = np.array([v.mean() for v in values])
    std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values])
    return epochs, mean, std


def plot_learning_curves(
    groups: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    path: str | Path,
    metrics: Sequence[str] = ("test_acc", "train_loss"),
    title: str | None = None,
) -> Path:
    """One panel per metric, one line per group (mean over its runs, ±1 std shaded); PNG.

    Args:
        groups: label -> list of runs, each a list of ``metrics.jsonl`` records.
        path: the PNG to write (atomically).
        metrics: record keys to draw; accuracies are shown in percent, losses on a log scale.
        title: a title over the panels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not groups:
        raise ValueError("plot_learning_curves needs at least one group of runs")
    fig = Figure(figsize=(5.0 * len(metrics), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        scale = 100.0 if metric.endswith("acc") else 1.0
        for label, runs in groups.items():
            epochs, mean, std = curve(runs, metric)
            if len(epochs) == 0:
                continue
            n = len(runs)
            (line,) = ax.plot(epochs, mean * scale, marker="o", ms=3, label=f"{label} (n={n})")
            if n > 1:
                ax.fill_between(
                    epochs, (mean - std) * scale, (mean + std) * scale,
                    color=line.get_color(), alpha=0.2, linewidth=0,
                )
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ylabel = METRIC_LABELS.get(metric, metric)
        ax.set_ylabel(ylabel + (" (%)" if scale == 100.0 else ""))
        if metric.endswith("loss"):
            ax.set_yscale("log")
            plain_log_axis(ax.yaxis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    path = Path(path)
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    return path
