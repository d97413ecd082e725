r"""``samkit eos``: gradient descent and SAM at the edge of stability, on real data.

Reproduces the central claims of Cohen et al. (2021) and Long & Bartlett (2023):

* full-batch gradient descent with step size η drives the top Hessian eigenvalue λ₁ up to
  :math:`2/\eta` and holds it there;
* full-batch SAM with radius ρ holds λ₁ at the *SAM-edge*
  :math:`4/(\eta(1 + \sqrt{1 + 8\rho/(\eta\|g\|)}))`, far below :math:`2/\eta`, and since the
  edge depends on the gradient norm it falls as :math:`\|g\|` falls during training.

The default: 2,000 Fashion-MNIST training images (stratified, standardized), an MLP with two
tanh layers of 128 units, the square loss of Cohen et al. (½ Σ over the 10 classes of
:math:`(f_c(x) - \text{onehot}_c(y))^2`, mean over the examples), full-batch GD with η = 0.1
and full-batch SAM with η = 0.1, ρ = 0.05, 300 steps each from the same initialization; λ₁ of
the whole training subset every 10 steps by Lanczos warm started from the last eigenvector
(:class:`samkit.train.edge.EdgeTracker`). It takes about a minute on 2 CPU cores.

Options: cross-entropy, the CNN, MNIST and CIFAR-10 subsets (when their files are present),
several η and several ρ in one call (every η runs GD and SAM with every ρ), USAM, heavy-ball
momentum, and a character-level Transformer on any text file trained with minibatch SGD and SAM
(λ₁ on a fixed probe set of windows, the SAM-edge with the gradient norm of each minibatch).

Writes ``runs/<name>/``: ``config.json`` (the resolved config), one folder per run with
``edge.jsonl`` (the tracker's rows), ``train.jsonl`` (loss and ‖g‖ of every step) and
``eos.png`` (λ₁ against steps with the 2/η line and the SAM-edge curve, the training loss, ‖g‖,
the alignments), then ``overview.png``, ``summary.json`` and ``report.md`` with the table: the
median of λ₁/edge over the second half of training and the first step at which λ₁ reaches the
edge, for every run.

References:
    J. Cohen, S. Kaur, Y. Li, J. Z. Kolter, A. Talwalkar. Gradient Descent on Neural Networks
    Typically Occurs at the Edge of Stability. ICLR 2021.
    P. M. Long, P. L. Bartlett. Sharpness-Aware Minimization and the Edge of Stability.
    arXiv:2309.12488, 2023.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from samkit.train.checkpoint import atomic_write, atomic_write_text
from samkit.train.edge import EdgeTracker

LOSSES = ("mse", "ce")
ASCENTS = ("sam", "usam")
# The acceptance bands of the issue: median λ₁/edge over the second half of training.
GD_BAND = (0.9, 1.2)
SAM_BAND = (0.8, 1.3)


@dataclass(frozen=True)
class EOSConfig:
    """Everything an ``samkit eos`` call depends on (saved as ``config.json``)."""

    # ---- data
    dataset: str = "fashion-mnist"  # fashion-mnist, mnist, cifar10 (from disk), digits, ...
    data_dir: str | None = None  # None: $SAMKIT_DATA, then the standard places
    subset: int | None = 2000  # training examples (stratified); None: the whole training set
    data_seed: int = 0  # seed of the subset
    text: str | None = None  # a UTF-8 text file: the character-level Transformer instead
    seq_len: int = 64  # Transformer: characters per window
    # ---- model
    model: str = "mlp"  # mlp or cnn (images); transformer (forced when `text` is given)
    model_kwargs: dict = field(default_factory=dict)  # passed to create_model, over the defaults
    # ---- loss
    loss: str = "mse"  # mse: ½ Σ_classes (f - onehot)², mean over examples; ce: cross-entropy
    # ---- optimization: every lr runs GD (if gd) and the SAM variant with every rho
    lrs: tuple[float, ...] = (0.1,)  # step sizes η
    rhos: tuple[float, ...] = (0.05,)  # SAM radii ρ (empty: GD only)
    gd: bool = True  # include the gradient-descent run of every η
    ascent: str = "sam"  # sam (ε = ρ g/‖g‖) or usam (ε = ρ g)
    momentum: float = 0.0  # heavy-ball momentum of the base SGD (0: plain GD, the papers')
    steps: int = 300  # optimizer steps per run
    batch_size: int = 0  # 0: full batch; the Transformer default is 32 (minibatch)
    seed: int = 0  # model initialization (the same for every run) and minibatch order
    # ---- the tracker
    every: int = 10  # measure λ₁ every this many steps (and at step 0)
    tol: float = 1e-3  # Lanczos relative tolerance
    probe_size: int = 512  # minibatch runs: λ₁ on this many fixed training examples
    # ---- where and how
    device: str = "cpu"  # cpu, cuda, cuda:N, auto
    threads: int | None = None  # torch CPU threads (None: torch's default)
    out_dir: str = "runs"  # parent folder
    name: str | None = None  # runs/<name>/ (None: eos-<dataset>-<model>-<loss>)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"Invalid loss: {self.loss!r} (allowed: {', '.join(LOSSES)})")
        if self.ascent not in ASCENTS:
            raise ValueError(f"Invalid ascent: {self.ascent!r} (allowed: {', '.join(ASCENTS)})")
        if not self.lrs or any(not (isinstance(v, (int, float)) and v > 0) for v in self.lrs):
            raise ValueError(f"Invalid lrs: {self.lrs!r} (allowed: one or more numbers > 0)")
        if any(not (isinstance(v, (int, float)) and v > 0) for v in self.rhos):
            raise ValueError(f"Invalid rhos: {self.rhos!r} (allowed: numbers > 0)")
        if not self.gd and not self.rhos:
            raise ValueError("Nothing to run: gd=False and no rhos (allowed: gd or some rho)")
        for key, low in (("steps", 1), ("every", 1), ("batch_size", 0), ("probe_size", 1),
                         ("seq_len", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Invalid {key}: {value!r} (allowed: an integer >= {low})")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"Invalid momentum: {self.momentum!r} (allowed: in [0, 1))")
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise ValueError(f"Invalid tol: {self.tol!r} (allowed: in (0, 1))")
        if self.subset is not None and (isinstance(self.subset, bool) or self.subset < 1):
            raise ValueError(f"Invalid subset: {self.subset!r} (allowed: None or an integer >= 1)")

    @property
    def is_text(self) -> bool:
        return self.text is not None

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        data = "text" if self.is_text else self.dataset
        return f"eos-{data}-{self.model_name}-{self.loss}"

    @property
    def model_name(self) -> str:
        return "transformer" if self.is_text else self.model

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name


def default_model_kwargs(config: EOSConfig) -> dict[str, Any]:
    """The model's settings: the defaults of the experiment, then ``config.model_kwargs``."""
    base: dict[str, Any] = {}
    if config.model_name == "mlp":
        base = {"depth": 2, "width": 128, "activation": "tanh"}
    elif config.model_name == "cnn":
        base = {"width": 32, "activation": "tanh"}
    elif config.model_name == "transformer":
        base = {"n_layer": 2, "n_head": 2, "n_embd": 64, "dropout": 0.0}
    return {**base, **config.model_kwargs}


def make_loss(kind: str):
    """``mse``: ½ Σ_classes (f − onehot(y))², mean over examples (and tokens); ``ce``: mean
    cross-entropy. Both take integer labels (``N`` or ``N×T``) and logits (``N×C`` or
    ``N×T×C``)."""
    if kind == "ce":
        def ce(out: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(out.flatten(0, -2), y.flatten())
        return ce

    def mse(out: Tensor, y: Tensor) -> Tensor:
        target = F.one_hot(y, out.shape[-1]).to(out.dtype)
        return 0.5 * (out - target).pow(2).sum(-1).mean()
    return mse


@dataclass(frozen=True)
class RunSpec:
    """One training run of the experiment."""

    label: str  # gd-lr0.1, sam-lr0.1-rho0.05
    optimizer: str  # sgd, sam or usam
    lr: float
    rho: float | None
    momentum: float = 0.0  # heavy-ball momentum of the base SGD


def run_specs(config: EOSConfig) -> list[RunSpec]:
    specs = []
    for lr in config.lrs:
        if config.gd:
            name = "gd" if config.momentum == 0 else f"gd-m{config.momentum:g}"
            specs.append(RunSpec(f"{name}-lr{lr:g}", "sgd", float(lr), None, config.momentum))
        for rho in config.rhos:
            specs.append(RunSpec(f"{config.ascent}-lr{lr:g}-rho{rho:g}", config.ascent,
                                 float(lr), float(rho), config.momentum))
    return specs


@dataclass
class RunResult:
    spec: RunSpec
    rows: list[dict[str, Any]]  # tracker rows
    train: list[dict[str, Any]]  # per-step loss and gradient norm
    diverged: bool
    seconds: float
    tracker_seconds: float
    matvecs: int
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class EOSResult:
    config: EOSConfig
    runs: list[RunResult]
    run_dir: Path
    wall_time: float
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- data and model


def load_data(config: EOSConfig, device: torch.device):
    from samkit.data import load_dataset, load_text

    if config.is_text:
        train, _ = load_text(config.text, config.seq_len, device=device)
    else:
        train, _ = load_dataset(
            config.dataset, data_dir=config.data_dir, subset=config.subset, stratified=True,
            seed=config.data_seed, standardize=True, device=device,
        )
    return train


def build_model(config: EOSConfig, train, device: torch.device):
    from samkit.models import create_model

    torch.manual_seed(config.seed)
    shape = (config.seq_len,) if config.is_text else tuple(train.x.shape[1:])
    model = create_model(config.model_name, shape, train.num_classes,
                         **default_model_kwargs(config))
    return model.to(device)


# --------------------------------------------------------------------------- one run


def train_run(
    config: EOSConfig, spec: RunSpec, train, run_dir: Path, device: torch.device,
    verbose: int = 1, prefix: str = "",
) -> RunResult:
    """Train one run from the shared initialization, tracking λ₁ every ``config.every`` steps."""
    from samkit.optim import create_optimizer
    from samkit.step import step_closure, take_step

    run_dir.mkdir(parents=True, exist_ok=True)
    loss_fn = make_loss("ce" if config.is_text and config.loss == "mse" else config.loss)
    model = build_model(config, train, device)
    model.train()
    kwargs: dict[str, Any] = {"lr": spec.lr, "momentum": spec.momentum}
    if spec.rho is not None:
        kwargs["rho"] = spec.rho
    opt = create_optimizer(spec.optimizer, model, **kwargs)

    # 1. the probe set: the whole training subset (full batch) or fixed examples (minibatch)
    n = len(train.y)
    batch_size = n if config.batch_size == 0 else min(config.batch_size, n)
    full_batch = batch_size == n
    if full_batch:
        probe = (train.x, train.y)
    else:
        gen = torch.Generator().manual_seed(config.seed + 1)
        idx = torch.randperm(n, generator=gen)[: config.probe_size].to(train.y.device)
        probe = (train.x[idx], train.y[idx])
    # a GD baseline records the alignment of the SAM gradient with the first rho
    rho_for_gd = config.rhos[0] if config.rhos else None
    tracker = EdgeTracker(probe, loss_fn, every=config.every, path=run_dir / "edge.jsonl",
                          rho=spec.rho if spec.rho is not None else rho_for_gd, tol=config.tol,
                          seed=config.seed)
    order = torch.Generator().manual_seed(config.seed)
    perm, cursor = None, n

    train_rows: list[dict[str, Any]] = []
    diverged = False
    start = time.perf_counter()
    last_print = start
    for t in range(config.steps + 1):
        # 2. the step's batch (the whole subset, or the next minibatch of a seeded shuffle)
        if full_batch:
            x, y = train.x, train.y
        else:
            if cursor + batch_size > n:
                perm, cursor = torch.randperm(n, generator=order).to(train.y.device), 0
            idx = perm[cursor : cursor + batch_size]
            cursor += batch_size
            x, y = train.x[idx], train.y[idx]

        # 3. measure at w_t, before step t (so ‖g‖ is the one step t normalizes by)
        row = tracker.maybe_record(t, model, opt, batch=None if full_batch else (x, y))
        if row is not None and verbose:
            now = time.perf_counter()
            if row.get("diverged"):
                print(f"{prefix}step {t:>5d}  diverged", flush=True)
            else:
                edge = f"{row['edge']:.2f}" if row.get("edge") is not None else "-"
                ratio = f"{row['ratio']:.3f}" if row.get("ratio") is not None else "-"
                print(f"{prefix}step {t:>5d}/{config.steps}  loss {row['loss']:.4f}  "
                      f"|g| {row['grad_norm']:.4f}  lambda1 {row['lambda1']:.2f}  edge {edge}  "
                      f"ratio {ratio}  2/lr {2 / spec.lr:.2f}  ({now - last_print:.1f} s)",
                      flush=True)
            last_print = now
        if row is not None and row.get("diverged"):
            diverged = True
            break
        if t == config.steps:
            break

        # 4. one step (samkit.step): the first pass's loss and ‖g‖ at w are logged before the
        #    optimizer uses them; a non-finite one ends the run without stepping
        def log_first_pass(loss: Tensor, t: int = t) -> None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))
            loss_value, grad_value = float(loss), float(grad_norm)
            train_rows.append({"step": t, "loss": loss_value, "grad_norm": grad_value})
            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                raise _Diverged

        try:
            take_step(opt, step_closure(opt, model, loss_fn, [(x, y)],
                                        after_first_pass=log_first_pass))
        except _Diverged:
            diverged = True
            break
    opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    atomic_write_text(run_dir / "train.jsonl", "".join(json.dumps(r) + "\n" for r in train_rows))
    result = RunResult(spec, list(tracker.rows), train_rows, diverged, seconds,
                       tracker.seconds, tracker.matvecs)
    result.summary = summarize(result, config.steps)
    if verbose:
        print(f"{prefix}done in {seconds:.1f} s; {tracker.cost_summary()} "
              f"({100 * tracker.seconds / max(seconds, 1e-9):.0f}% of the run)", flush=True)
    return result


class _Diverged(Exception):  # noqa: N818 - not an error: a run that diverged ends early
    """Raised from the step's closure when the first pass is non-finite."""


# --------------------------------------------------------------------------- summary


def _median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def summarize(run: RunResult, steps: int) -> dict[str, Any]:
    """The numbers of the table for one run.

    ``median_ratio``: median of λ₁/edge over the measurements of the second half of training
    (steps >= steps/2); ``median_lambda1``, ``median_edge`` likewise; ``first_at_edge``: the
    first measured step with λ₁ >= edge; ``edge_early``: the median edge over the first quarter
    (after step 0); ``lambda1_over_gd_edge``: median λ₁·η/2 over the second half.
    """
    rows = [r for r in run.rows if not r.get("diverged") and r.get("lambda1") is not None]
    late = [r for r in rows if r["step"] >= steps / 2]
    early = [r for r in rows if 0 < r["step"] <= steps / 4]
    first = next((r["step"] for r in rows if r.get("edge") is not None
                  and r["lambda1"] >= r["edge"]), None)
    lr = run.spec.lr
    out = {
        "label": run.spec.label,
        "optimizer": run.spec.optimizer,
        "lr": lr,
        "rho": run.spec.rho,
        "gd_edge": 2.0 / lr,
        "lambda1_init": rows[0]["lambda1"] if rows else None,
        "median_lambda1": _median([r["lambda1"] for r in late]),
        "median_edge": _median([r.get("edge") for r in late]),
        "median_ratio": _median([r.get("ratio") for r in late]),
        "lambda1_over_gd_edge": _median([r["lambda1"] * lr / 2 for r in late]),
        "edge_early": _median([r.get("edge") for r in early]),
        "grad_norm_early": _median([r["grad_norm"] for r in early]),
        "grad_norm_late": _median([r["grad_norm"] for r in late]),
        "first_at_edge": first,
        "final_loss": run.train[-1]["loss"] if run.train else None,
        "diverged": run.diverged,
        "seconds": run.seconds,
        "tracker_seconds": run.tracker_seconds,
        "matvecs": run.matvecs,
        "measurements": len(run.rows),
    }
    band = GD_BAND if run.spec.rho is None else SAM_BAND
    ratio = out["median_ratio"]
    out["at_edge"] = ratio is not None and band[0] <= ratio <= band[1]
    return out


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return format(value, spec)


def format_table(result: EOSResult) -> str:
    """The summary table (Markdown): one row per run."""
    head = ("| run | η | ρ | 2/η | λ₁ at step 0 | median λ₁ (2nd half) | median edge (2nd half) "
            "| median λ₁/edge | median λ₁/(2/η) | first step λ₁ ≥ edge | edge early → late "
            "| ‖g‖ early → late | final loss | in band | time (tracker) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in result.runs:
        s = run.summary
        band = GD_BAND if s["rho"] is None else SAM_BAND
        lines.append(
            f"| {s['label']} | {s['lr']:g} | {_fmt(s['rho'], 'g')} | {s['gd_edge']:.2f} "
            f"| {_fmt(s['lambda1_init'], '.2f')} | {_fmt(s['median_lambda1'], '.2f')} "
            f"| {_fmt(s['median_edge'], '.2f')} | **{_fmt(s['median_ratio'])}** "
            f"| {_fmt(s['lambda1_over_gd_edge'])} | {_fmt(s['first_at_edge'], 'd')} "
            f"| {_fmt(s['edge_early'], '.2f')} → {_fmt(s['median_edge'], '.2f')} "
            f"| {_fmt(s['grad_norm_early'], '.3f')} → {_fmt(s['grad_norm_late'], '.3f')} "
            f"| {_fmt(s['final_loss'], '.4f')} "
            f"| {'yes' if s['at_edge'] else 'no'} [{band[0]}, {band[1]}]"
            f"{' (diverged)' if s['diverged'] else ''} "
            f"| {s['seconds']:.0f} s ({s['tracker_seconds']:.0f} s) |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def plot_run(run: RunResult, path: Path, title: str = "") -> Path:
    """Four panels: λ₁ with the 2/η line and the SAM-edge curve; loss; ‖g‖; alignments."""
    from matplotlib.figure import Figure

    rows = [r for r in run.rows if r.get("lambda1") is not None]
    fig = Figure(figsize=(13, 3.2), constrained_layout=True)
    axes = fig.subplots(1, 4)
    steps = [r["step"] for r in rows]
    ax = axes[0]
    ax.plot(steps, [r["lambda1"] for r in rows], "o-", ms=3, color="C0", label="λ₁")
    ax.axhline(2 / run.spec.lr, ls="--", color="k", lw=1, label="2/η")
    if run.spec.rho is not None:
        # the SAM-edge at every step, from that step's gradient norm, and at the measurements
        edges = _edges_per_step(run)
        if edges:
            ax.plot([e[0] for e in edges], [e[1] for e in edges], color="C3", lw=0.8,
                    alpha=0.6, label=f"{run.spec.optimizer.upper()}-edge")
        ax.plot(steps, [r.get("edge") for r in rows], "s", ms=2.5, color="C3")
    elif rows and rows[0].get("edge_kind") not in ("gd", None):
        ax.plot(steps, [r.get("edge") for r in rows], color="C3", lw=1, label="edge")
    ax.set_xlabel("step")
    ax.set_ylabel("top Hessian eigenvalue")
    ax.legend(fontsize=8)
    ax.set_title(title or run.spec.label, fontsize=9)
    train = run.train
    axes[1].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    axes[1].set_ylabel("training loss")
    axes[1].set_yscale("log")
    axes[2].plot([r["step"] for r in train], [r["grad_norm"] for r in train], lw=0.8)
    axes[2].set_ylabel("‖g‖ (step's batch)")
    axes[2].set_yscale("log")
    axes[3].plot(steps, [r["align_grad"] for r in rows], "o-", ms=3, label="|⟨g, v₁⟩|/‖g‖")
    if any(r.get("align_sam_grad") is not None for r in rows):
        axes[3].plot(steps, [r.get("align_sam_grad") for r in rows], "s-", ms=3,
                     label="SAM gradient")
    axes[3].set_ylabel("alignment with v₁")
    axes[3].set_ylim(0, 1.02)
    axes[3].legend(fontsize=8)
    for a in axes[1:]:
        a.set_xlabel("step")
    _save(fig, path)
    return path


def _edges_per_step(run: RunResult) -> list[tuple[int, float]]:
    from samkit.stability import momentum_edge, sam_edge, usam_edge

    lr, rho = run.spec.lr, run.spec.rho
    # the base optimizer's edge E; SAM over it is sam_edge(2/E, ...) (see edge_for)
    eff = 2.0 / float(momentum_edge(lr, run.spec.momentum))
    if run.spec.optimizer == "usam":
        return [(r["step"], float(usam_edge(eff, rho))) for r in run.train]
    return [(r["step"], float(sam_edge(eff, rho, r["grad_norm"]))) for r in run.train
            if math.isfinite(r["grad_norm"])]


def plot_overview(result: EOSResult, path: Path) -> Path:
    """λ₁/edge of every run against steps, and λ₁ against 2/η and the edges."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6), constrained_layout=True)
    ax1, ax2 = fig.subplots(1, 2)
    for i, run in enumerate(result.runs):
        rows = [r for r in run.rows if r.get("lambda1") is not None]
        color = f"C{i % 10}"
        steps = [r["step"] for r in rows]
        ax1.plot(steps, [r.get("ratio") for r in rows], "o-", ms=2.5, color=color,
                 label=run.spec.label)
        ax2.plot(steps, [r["lambda1"] for r in rows], "o-", ms=2.5, color=color,
                 label=f"{run.spec.label} λ₁")
        ax2.plot(steps, [r.get("edge") for r in rows], ":", color=color, lw=1)
        ax2.axhline(2 / run.spec.lr, ls="--", color=color, lw=0.6)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xlabel("step")
    ax1.set_ylabel("λ₁ / edge")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("step")
    ax2.set_ylabel("λ₁ (solid), edge (dotted), 2/η (dashed)")
    ax2.legend(fontsize=7)
    _save(fig, path)
    return path


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))


# --------------------------------------------------------------------------- the experiment


def run_eos(config: EOSConfig, verbose: int = 1, command: str | None = None) -> EOSResult:
    """Run every (η, optimizer, ρ) of ``config``; write the runs, figures, table and summary."""
    from samkit.train.trainer import resolve_device

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = dataclasses.asdict(config)
    resolved["model_kwargs"] = default_model_kwargs(config)
    atomic_write_text(run_dir / "config.json", json.dumps(resolved, indent=2) + "\n")
    notes = []
    if config.is_text and config.loss == "mse":
        notes.append("the Transformer is trained with cross-entropy (mse is for images)")
    start = time.perf_counter()
    train = load_data(config, device)
    specs = run_specs(config)
    if verbose:
        what = "full batch" if config.batch_size == 0 else f"batch {config.batch_size}"
        data = config.text if config.is_text else f"{config.dataset} ({len(train.y)} examples)"
        print(f"samkit eos: {data}, {config.model_name} {default_model_kwargs(config)}, "
              f"loss {config.loss}, {what}, {config.steps} steps, λ₁ every {config.every} "
              f"steps; runs: {', '.join(s.label for s in specs)}", flush=True)
        for note in notes:
            print(f"note: {note}", flush=True)
    runs = []
    for i, spec in enumerate(specs):
        prefix = f"[{i + 1}/{len(specs)} {spec.label}] "
        run = train_run(config, spec, train, run_dir / spec.label, device, verbose, prefix)
        plot_run(run, run_dir / spec.label / "eos.png",
                 title=f"{spec.label}: {config.model_name}, {config.loss}")
        runs.append(run)
    result = EOSResult(config, runs, run_dir, time.perf_counter() - start, notes)
    plot_overview(result, run_dir / "overview.png")
    write_report(result, command)
    return result


def write_report(result: EOSResult, command: str | None = None) -> None:
    summary = {"config": dataclasses.asdict(result.config), "runs": [r.summary for r in
               result.runs], "wall_time": result.wall_time, "notes": result.notes}
    atomic_write_text(result.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    text = [f"# samkit eos: {result.config.run_name}", ""]
    if command:
        text += ["```", command, "```", ""]
    text += [format_table(result), "",
             f"Median over the measurements of the second half of training; the edge is 2/η "
             f"for GD and the SAM-edge with that step's ‖g‖ for SAM. Bands: GD {GD_BAND}, SAM "
             f"{SAM_BAND}. {len(result.runs)} runs in {result.wall_time:.0f} s.", ""]
    text += [f"![{r.spec.label}]({r.spec.label}/eos.png)" for r in result.runs]
    text += ["", "![overview](overview.png)", ""]
    text += [f"note: {n}" for n in result.notes]
    atomic_write_text(result.run_dir / "report.md", "\n".join(text) + "\n")


# --------------------------------------------------------------------------- the command


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``samkit eos`` to the CLI's subparsers; the handler is :func:`cmd_eos`."""
    d = EOSConfig()
    p = sub.add_parser(
        "eos", help="GD and SAM at the edge of stability (λ₁ vs 2/η and the SAM-edge)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Full-batch GD and SAM from one initialization, tracking the top Hessian "
        "eigenvalue: GD settles at 2/η (Cohen et al. 2021), SAM at the SAM-edge, which falls "
        "with ‖g‖ (Long & Bartlett 2023). Writes runs/<name>/{report.md,summary.json,"
        "overview.png,<run>/eos.png,<run>/edge.jsonl}. Default: 2,000 Fashion-MNIST images, "
        "MLP 2x128 tanh, square loss, η=0.1, ρ=0.05, 300 steps (about a minute on 2 cores).",
        epilog="examples:\n"
        "  samkit eos\n"
        "  samkit eos --lr 0.1 0.05 --rho 0.02 0.05 0.1 --steps 500\n"
        "  samkit eos --loss ce --model cnn --dataset cifar10 --subset 1000 --lr 0.05\n"
        "  samkit eos --text input.txt --batch-size 32 --lr 0.5 --rho 0.05 --steps 400\n",
    )
    p.add_argument("--dataset", default=d.dataset, help="fashion-mnist, mnist, cifar10, ...")
    p.add_argument("--data-dir", default=None, help="folder with the data files")
    p.add_argument("--subset", type=int, default=d.subset, help="training examples (stratified)")
    p.add_argument("--text", default=None, help="a UTF-8 text file: the character-level "
                   "Transformer with minibatch SGD/SAM")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="Transformer window length")
    p.add_argument("--model", default=d.model, help="mlp or cnn")
    p.add_argument("--width", type=int, default=None,
                   help="hidden units (MLP, default 128) / channels (CNN, 32) / n_embd (64)")
    p.add_argument("--depth", type=int, default=None,
                   help="hidden layers (MLP, default 2) / n_layer (Transformer, 2)")
    p.add_argument("--activation", default=None, help="tanh (default), relu, ...")
    p.add_argument("--loss", default=d.loss, choices=LOSSES, help="mse (default) or ce")
    p.add_argument("--lr", dest="lrs", type=float, nargs="+", default=list(d.lrs),
                   help="step sizes η (each runs GD and SAM)")
    p.add_argument("--rho", dest="rhos", type=float, nargs="*", default=list(d.rhos),
                   help="SAM radii ρ (none: GD only)")
    p.add_argument("--no-gd", action="store_true", help="skip the GD runs")
    p.add_argument("--usam", action="store_true", help="unnormalized SAM (ε = ρ g) instead")
    p.add_argument("--momentum", type=float, default=d.momentum, help="heavy-ball momentum")
    p.add_argument("--steps", type=int, default=d.steps, help="steps per run")
    p.add_argument("--batch-size", type=int, default=None,
                   help="0: full batch (default for images); the Transformer default: 32")
    p.add_argument("--every", type=int, default=d.every, help="measure λ₁ every N steps")
    p.add_argument("--tol", type=float, default=d.tol, help="Lanczos relative tolerance")
    p.add_argument("--probe-size", type=int, default=d.probe_size,
                   help="minibatch runs: λ₁ on this many fixed examples")
    p.add_argument("--seed", type=int, default=d.seed, help="initialization seed")
    p.add_argument("--device", default=d.device, help="cpu, cuda, auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out-dir", default=d.out_dir, help="parent folder (default: runs)")
    p.add_argument("--name", default=None, help="runs/<name>/")
    p.add_argument("--quiet", "-q", action="store_true", help="only the final table")
    p.set_defaults(handler=cmd_eos)
    return p


def config_from_args(args: argparse.Namespace) -> EOSConfig:
    names = {"width": "width", "depth": "depth", "activation": "activation"}
    if args.text:  # the Transformer's width and depth
        names = {"width": "n_embd", "depth": "n_layer"}
    model_kwargs = {key: getattr(args, flag) for flag, key in names.items()
                    if getattr(args, flag) is not None}
    batch_size = args.batch_size
    if batch_size is None:
        batch_size = 32 if args.text else 0
    return EOSConfig(
        dataset=args.dataset, data_dir=args.data_dir, subset=args.subset, text=args.text,
        seq_len=args.seq_len, model=args.model, model_kwargs=model_kwargs, loss=args.loss,
        lrs=tuple(args.lrs), rhos=tuple(args.rhos), gd=not args.no_gd,
        ascent="usam" if args.usam else "sam", momentum=args.momentum, steps=args.steps,
        batch_size=batch_size, seed=args.seed, every=args.every, tol=args.tol,
        probe_size=args.probe_size, device=args.device, threads=args.threads,
        out_dir=args.out_dir, name=args.name,
    )


def cmd_eos(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``samkit eos``; print the table; exit status 0 (2 for bad input, via the CLI)."""
    import shlex

    config = config_from_args(args)
    command = "samkit " + " ".join(shlex.quote(a) for a in argv) if argv else None
    result = run_eos(config, verbose=0 if args.quiet else 1, command=command)
    print()
    print(format_table(result))
    print(f"\n{len(result.runs)} runs in {result.wall_time:.0f} s; report: "
          f"{result.run_dir / 'report.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m samkit.experiments.eos``: the same as ``samkit eos``."""
    import sys

    parser = argparse.ArgumentParser(prog="samkit")
    add_parser(parser.add_subparsers(dest="command"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["eos", *argv])
    try:
        return cmd_eos(args, ["eos", *argv])
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"samkit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
