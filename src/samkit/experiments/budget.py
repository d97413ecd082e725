"""Fair comparisons for ``samkit compare``: passes and seconds counted, hyperparameter grids
chosen on a validation split, an equal-budget baseline, time-to-accuracy curves.

* :class:`PassMeter` (a trainer callback) counts forward-backward passes (forward calls of the
  model in training mode with autograd on: a SAM step is 2, an SGD or SAF step 1, MESA's EMA
  forward and evaluations are not counted) and the seconds spent in steps; each epoch record
  gets ``passes`` and ``step_seconds`` (cumulative).
* :func:`expand_spec`: ``sam:rho=0.02,0.05,0.1`` is a grid of three candidates (several keys:
  their product). Each candidate trains on the training set minus a stratified validation
  split (``val_fraction``, seeded by ``data_seed``); the candidate with the best mean final
  validation accuracy over the seeds is the method's row, and only its test accuracy is
  reported. Without a grid nothing is held out.
* :func:`equal_budget_steps`: the baseline (``equal_budget``, e.g. ``sgd``) is trained again for
  the budget of the most expensive method, in training seconds (``budget="time"``) or in
  passes (``budget="passes"``): its number of steps is scaled by the ratio of the measured
  costs, and its LR schedule spans that budget.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from samkit.config import setting
from samkit.train.callbacks import Callback

BUDGETS = ("time", "passes")


@dataclass(frozen=True)
class CompareOptions:
    """How ``samkit compare`` makes its comparison fair (besides the shared TrainConfig)."""

    equal_budget: str | None = setting(
        None, "an optimizer trained again for the budget of the most expensive method, shown "
        "as its own row (e.g. sgd; none: no such row)")
    budget: str = setting(
        "time", "what the equal-budget row matches: time (training seconds, measured) or "
        "passes (forward-backward passes, counted)", flag="--equal-by")
    val_fraction: float = setting(
        0.1, "the share of the training set held out to choose among a grid's candidates "
        "(sam:rho=0.02,0.05,0.1); used only when some method has a grid")
    jobs: int = setting(
        1, "runs trained at once, each in its own process with the config's threads (2 on 2 "
        "cores with threads 1 halves the wall time; the results are the same)",
        flag=("--jobs", "-j"))
    tune_seed: int | None = setting(
        None, "the tuned protocol: each grid's value is chosen by validation accuracy on runs "
        "with this seed (never one of the test seeds), then every method trains at its chosen "
        "value on the whole training set with the test seeds; the report gives the paired "
        "difference of every pair of methods with its 0.95 confidence interval (None: off)")

    def __post_init__(self) -> None:
        if isinstance(self.equal_budget, str) and self.equal_budget.lower() in ("none", ""):
            object.__setattr__(self, "equal_budget", None)
        if self.budget not in BUDGETS:
            raise ValueError(f"Invalid budget: {self.budget!r} (allowed: {', '.join(BUDGETS)})")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise ValueError(
                f"Invalid val_fraction: {self.val_fraction!r} (allowed: a number in (0, 1))")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise ValueError(f"Invalid jobs: {self.jobs!r} (allowed: an integer >= 1)")
        if self.tune_seed is not None:
            from samkit.optim._validation import check_seed

            check_seed("tune_seed", self.tune_seed)


# ------------------------------------------------------------------------- counting


def step_clock() -> float:
    """The clock :class:`PassMeter` reads by default: ``time.perf_counter``. The equal-time row
    depends on the seconds it measures; tests replace it (``budget.step_clock = fake``, before
    the runs are built) with a deterministic clock."""
    return time.perf_counter()


class PassMeter(Callback):
    """Counts forward-backward passes and step seconds; adds them to every epoch record.

    Args:
        clock: seconds as a float, read at the start and the end of every step (default:
            :func:`step_clock`, as it is when the meter is made).
    """

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock if clock is not None else step_clock
        self.passes = 0
        self.seconds = 0.0
        self._t0: float | None = None
        self._handle = None

    def on_train_start(self, state) -> None:
        model = state.model

        def count(module, args):
            if module.training and torch.is_grad_enabled():
                self.passes += 1

        self._handle = model.register_forward_pre_hook(count)

    def on_step_start(self, state, step: int) -> None:
        self._t0 = self.clock()

    def on_step_end(self, state, step: int, loss) -> None:
        if self._t0 is not None:
            if torch.cuda.is_available() and loss.is_cuda:
                torch.cuda.synchronize(loss.device)
            self.seconds += self.clock() - self._t0
            self._t0 = None

    def on_epoch_end(self, state, epoch: int, metrics: dict[str, Any]) -> None:
        metrics["passes"] = self.passes
        metrics["step_seconds"] = self.seconds

    def on_train_end(self, state, metrics: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def state_dict(self) -> dict[str, Any]:
        return {"passes": self.passes, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.passes, self.seconds = int(state["passes"]), float(state["seconds"])


class ValidationAccuracy(Callback):
    """Adds ``val_loss`` and ``val_acc`` on ``split`` to every evaluated epoch's record."""

    def __init__(self, split: Any) -> None:
        self.split = split

    def on_epoch_end(self, state, epoch: int, metrics: dict[str, Any]) -> None:
        if "test_acc" in metrics:
            metrics["val_loss"], metrics["val_acc"] = state.evaluate(self.split)


def carve_validation(train: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """``(train minus val, val)``: a stratified ``fraction`` of ``train`` held out (seeded)."""
    import numpy as np

    from samkit.data.split import subset_indices

    n = len(train.y)
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(f"Invalid val_fraction: {fraction} leaves no training examples of {n}")
    val = torch.as_tensor(subset_indices(train.y, k, stratified=True, seed=seed))
    keep = torch.as_tensor(np.setdiff1d(np.arange(n), val.numpy()))
    val, keep = val.to(train.x.device), keep.to(train.x.device)
    return (replace(train, x=train.x[keep], y=train.y[keep]),
            replace(train, x=train.x[val], y=train.y[val], name=f"{train.name} (validation)"))


# ------------------------------------------------------------------------- grids


def expand_spec(spec: str) -> list[str]:
    """The candidates of a spec: ``sam:rho=0.02,0.05,0.1`` -> ``sam:rho=0.02``, ... (a part
    without ``=`` is another value of the key before it; several keys give their product).
    A spec without a grid is its own single candidate."""
    name, _, rest = spec.partition(":")
    keys: list[tuple[str, list[str]]] = []
    for part in (p.strip() for p in rest.split(",")):
        if not part:
            continue
        if "=" in part:
            key, _, value = part.partition("=")
            keys.append((key.strip(), [value.strip()]))
        elif keys:
            keys[-1][1].append(part)
        else:
            raise ValueError(
                f"Invalid optimizer spec {spec!r}: {part!r} has no key (allowed: "
                "name:key=v1,v2,...,key2=value)")
    if all(len(values) == 1 for _, values in keys):
        return [spec]
    out = []
    for combo in itertools.product(*(values for _, values in keys)):
        settings = ",".join(f"{k}={v}" for (k, _), v in zip(keys, combo, strict=True))
        out.append(f"{name.strip()}:{settings}")
    return out


def mean_final(runs: Sequence[Sequence[Mapping[str, Any]]], key: str) -> float:
    """The mean over runs of the last epoch record's ``key`` (NaN when none has it)."""
    values = []
    for records in runs:
        found = [r[key] for r in records if r.get("event", "epoch") == "epoch" and key in r]
        if found and found[-1] is not None and not math.isnan(found[-1]):
            values.append(float(found[-1]))
    return statistics.fmean(values) if values else math.nan


def select_candidate(candidates: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> str:
    """The candidate with the best mean final ``val_acc`` (the first one on ties)."""
    scored = [(mean_final(runs, "val_acc"), label) for label, runs in candidates.items()]
    best = max((s for s, _ in scored if not math.isnan(s)), default=None)
    if best is None:
        return next(iter(candidates))
    return next(label for s, label in scored if s == best)


# ------------------------------------------------------------------------- equal budget


def cost(runs: Sequence[Sequence[Mapping[str, Any]]], budget: str) -> float:
    """The mean total training seconds (``time``) or passes (``passes``) of ``runs``."""
    return mean_final(runs, "step_seconds" if budget == "time" else "passes")


def equal_budget_steps(base_steps: int, base_cost: float, target_cost: float) -> int:
    """The steps that give the baseline (``base_cost`` for ``base_steps``) ``target_cost``."""
    if not (base_cost > 0 and math.isfinite(base_cost) and math.isfinite(target_cost)):
        raise ValueError(f"Invalid costs for the equal-budget row: {base_cost}, {target_cost}")
    return max(1, round(base_steps * target_cost / base_cost))


# ------------------------------------------------------------------------- curves


def _mean_curve(runs, x_key: str):
    """Per epoch: mean x (cumulative seconds or passes) and mean test accuracy over the runs."""
    by_epoch: dict[int, list[tuple[float, float]]] = {}
    for records in runs:
        for r in records:
            if r.get("event", "epoch") == "epoch" and "test_acc" in r and x_key in r:
                by_epoch.setdefault(int(r["epoch"]), []).append((r[x_key], r["test_acc"]))
    xs = [statistics.fmean(v[0] for v in by_epoch[e]) for e in sorted(by_epoch)]
    ys = [statistics.fmean(v[1] for v in by_epoch[e]) for e in sorted(by_epoch)]
    return xs, ys


def time_to_accuracy(runs, target: float) -> tuple[float, float]:
    """Mean seconds and passes at the first epoch whose mean test accuracy reaches ``target``
    (NaN when it never does)."""
    xs, ys = _mean_curve(runs, "step_seconds")
    ps, _ = _mean_curve(runs, "passes")
    for x, p, y in zip(xs, ps, ys, strict=False):
        if y >= target:
            return x, p
    return math.nan, math.nan


def plot_time_to_accuracy(groups: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
                          path: str | Path, title: str | None = None) -> Path:
    """Test accuracy against training seconds and against passes, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from samkit.train.checkpoint import atomic_write

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    drawn = False
    for ax, key, label in ((axes[0], "step_seconds", "training seconds (steps only)"),
                           (axes[1], "passes", "forward-backward passes")):
        for name, runs in groups.items():
            xs, ys = _mean_curve(runs, key)
            if xs:
                ax.plot(xs, [100 * y for y in ys], marker=".", label=name)
                drawn = True
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    if drawn:
        axes[1].legend(fontsize=8)
    else:
        fig.text(0.5, 0.5, "no run recorded passes and seconds", ha="center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return atomic_write(Path(path), lambda handle: fig.savefig(handle, format="png", dpi=110))
