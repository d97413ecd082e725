r"""The edge-of-stability tracker: λ₁ of the Hessian against the edge of the optimizer in use.

Every ``every`` steps, on a fixed probe set (the whole training subset in full-batch runs), the
tracker measures at the current weights :math:`w` (the rule: ``EdgeTracker(every=k)`` measures
every k steps, whatever it costs; a ``budget`` caps its share of the run's time and leaves due
steps out; with neither given it measures every 10 steps within 25 % of the run's time; the
one-time warm-up before the first measurement is outside the budget; see :class:`EdgeTracker`)

* the loss :math:`L(w)` and the gradient :math:`g = \nabla L(w)`, its norm :math:`\|g\|`;
* the top Hessian eigenpair :math:`(\lambda_1, v_1)` by block Lanczos from the last :math:`v_1`
  and a fresh random direction, with its honest stop (at least 20 Krylov directions, then the
  residual test): about 20–30 Hessian-vector products per measurement;
* the edge that applies to the optimizer (:func:`edge_for`): :math:`2/\eta` for gradient descent,
  the momentum and Nesterov edges, the SAM-edge with the current :math:`\|g\|`, the USAM edge,
  or, for Adam, the *preconditioned* sharpness :math:`\lambda_1(P^{-1}H)` against ``adam_edge``;
* the ratio :math:`\lambda_1/\text{edge}` (about 1 at the edge of stability);
* for a sharpness-aware optimizer whose ascent declares an effective-Hessian form (SAM, USAM,
  ASAM with p = 2, Fisher SAM, GSAM/LookSAM over them), ``lambda_eff`` =
  :math:`\lambda_{max}(H_\mathrm{eff})` (:func:`samkit.curvature.effective_hessian`, with the
  probe set's :math:`g`; for Adam :math:`\lambda_{max}(P^{-1}H_\mathrm{eff})`), ``base_edge``
  (:func:`samkit.stability.base_edge_for`) and ``eff_ratio`` = their ratio; None otherwise;
* the alignments :math:`|\langle g, v_1\rangle|/\|g\|` and
  :math:`|\langle g_{\mathrm{SAM}}, v_1\rangle|/\|g_{\mathrm{SAM}}\|` with
  :math:`g_{\mathrm{SAM}} = \nabla L(w + \epsilon)` (:math:`\epsilon = \rho g/\|g\|` for SAM,
  :math:`\rho g` for USAM).

Each measurement is one JSON row (``edge.jsonl`` in a trainer run) and the tracker keeps its cost:
seconds and Hessian-vector products, in total and per row, its share of the run and the due
steps it left out to stay within the budget.

**Under data parallelism** (torchrun, DDP, ``torch.distributed`` initialized with more than one
process): each rank holds its shard of the probe set (and of the step's batch), and every
measurement answers for the union of the shards, weighted by their sizes (``process_group``:
the curvature operators' process group, one all-reduce per Hessian-vector product), the same
row on every rank, equal to one process over all the data. Every rank decides the same due
steps under a budget (the decision is taken from the largest clock of the ranks, one
all-reduce at a due step), and only rank 0 writes the rows (the file, ``verbose`` lines). In a
trainer run the probe set is sharded over the ranks by itself.

Two ways to use it::

    # 1. a trainer callback: measures before steps 0, every, 2·every, ... (the same point as
    #    the plain loop below, with the step's batch) and at the final weights
    Trainer(cfg, callbacks=[EdgeTracker(every=10)]).fit()     # runs/<name>/edge.jsonl

    # 2. a plain loop: measure at w_t, before step t (the gradient norm SAM's step t uses);
    #    under torchrun (x, y) is this rank's shard of the probe set
    tracker = EdgeTracker((x, y), loss_fn, every=10, path="edge.jsonl")
    for t in range(steps):
        tracker.maybe_record(t, model, opt)
        ...  # the optimizer step
    print(tracker.cost_summary())

References:
    J. Cohen, S. Kaur, Y. Li, J. Z. Kolter, A. Talwalkar. Gradient Descent on Neural Networks
    Typically Occurs at the Edge of Stability. ICLR 2021.
    P. M. Long, P. L. Bartlett. Sharpness-Aware Minimization and the Edge of Stability.
    arXiv:2309.12488, 2023.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from samkit import stability
from samkit.stability import base_edge_for, edge_for, optimizer_kind
from samkit.train.callbacks import Callback

if TYPE_CHECKING:
    from samkit.train.callbacks import TrainState

__all__ = ["DEFAULT_BUDGET", "DEFAULT_EVERY", "EdgeTracker", "edge_for", "format_row",
           "optimizer_kind", "read_edge_rows"]

LossFn = Callable[[Any, Any], Tensor]

# The defaults when neither ``every`` nor ``budget`` is given: every 10 steps within 25 % of the
# run's time. An explicit ``every`` alone means every ``every`` steps (no budget).
DEFAULT_EVERY = 10
DEFAULT_BUDGET = 0.25


# --------------------------------------------------------------------------- the probe set


def _batches(data: Any) -> list[tuple[Any, Any]]:
    """``(x, y)`` or a list of ``(x, y)`` batches, as a list of batches (each with at least one
    example: a mean over none is no loss)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        batches = [(data[0], data[1])]
    elif isinstance(data, (tuple, list)) and data and all(
        isinstance(b, (tuple, list)) and len(b) == 2 for b in data
    ):
        batches = [(b[0], b[1]) for b in data]
    else:
        raise ValueError(
            f"Invalid probe: {type(data).__name__} (allowed: one (x, y) batch or a non-empty "
            "list of (x, y) batches)"
        )
    for i, (x, y) in enumerate(batches):
        n = _examples(x, y)
        if n == 0:
            where = "" if len(batches) == 1 else f" (batch {i} of {len(batches)})"
            raise ValueError(
                f"Invalid probe: no examples{where} (allowed: batches of at least one example; "
                "the loss and Hessian of an empty batch are undefined)"
            )
    return batches


def _examples(x: Any, y: Any) -> int | None:
    """The number of examples of a batch (``len(y)``, else of ``x`` or of a tensor in ``x``);
    None when it cannot be told."""
    for value in (y, x, *(x.values() if isinstance(x, dict) else ())):
        if isinstance(value, Tensor):
            return int(value.shape[0]) if value.dim() > 0 else None
        try:
            return len(value)
        except TypeError:
            continue
    return None


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# --------------------------------------------------------------------------- the tracker


class EdgeTracker(Callback):
    r"""Tracks λ₁ of the Hessian on a probe set against the optimizer's edge of stability.

    Args:
        probe: the probe set, one ``(x, y)`` batch or a list of batches (the loss over several
            is the size-weighted mean); a batch without examples is refused here. ``None`` in a
            trainer run: the training set when it has at most ``probe_size`` examples
            (full-batch runs: exactly the training subset), otherwise a fixed, seeded draw of
            ``probe_size`` of its examples.
        loss_fn: ``loss_fn(model(x), y)``, the **mean** loss over a batch; ``None`` in a trainer
            run: the trainer's loss.
        every: measure at step 0 and then every ``every`` steps. Given without ``budget``:
            at every one of those steps, whatever it costs (the cost is in
            :meth:`cost_summary`). Not given: every 10 steps within a 25 % budget.
        path: append the rows here as JSON lines (the file is started afresh); ``None`` in a
            trainer run: ``runs/<name>/edge.jsonl``; ``None`` in a plain loop: keep them only in
            :attr:`rows`.
        rho: the radius of the SAM gradient whose alignment is recorded when the optimizer is
            not SAM/USAM (e.g. for a gradient-descent baseline); default: the optimizer's ρ, and
            for other optimizers no SAM alignment.
        tol: Lanczos' relative tolerance on λ₁ (and the other ``k - 1`` values).
        max_iter: most Hessian-vector products per Lanczos run.
        k: how many top eigenvalues to record (``lambda1`` and, for ``k > 1``,
            ``eigenvalues``, largest first).
        probe_size: see ``probe``.
        seed: seeds Lanczos' first start vector and the probe draw.
        params: the parameters to differentiate (default: all with ``requires_grad``).
        preconditioned: also measure :math:`\lambda_1(P^{-1}H)` for Adam (``"auto"``: when the
            optimizer is Adam / AdamW; ``False``: never).
        verbose: print one line per measurement.
        effective: also measure :math:`\lambda_{max}(H_\mathrm{eff})`, the effective Hessian of
            the sharpness-aware step (:func:`samkit.curvature.effective_hessian`), against the
            base optimizer's edge (``"auto"``: for every optimizer whose ascent declares a form;
            ``False``: never). For SAM and USAM (:math:`H_\mathrm{eff} = H + cH^2`) it comes
            from λ₁'s own Krylov space for one more product
            (:func:`~samkit.curvature.effective.effective_top_on_krylov`); for the other forms
            (or when that pair misses ``tol``) from Lanczos on :math:`H_\mathrm{eff}`, warm
            started from it, each of whose products costs two Hessian-vector products.
        budget: the largest share :math:`b` of the run's time the tracker may take.
            ``"auto"`` (the default): 0.25 when ``every`` is not given, ``None`` when it is
            (the user asked for every ``every`` steps). A due step is measured when (1) the
            run has spent :math:`c\,(1 - b)/b` seconds outside the tracker since its last
            measurement, which took :math:`c` (measurements evenly paced, no bursts), and (2)
            the tracker's seconds plus the next measurement's (estimated by the largest of the
            last three) stay within :math:`b` times the run's seconds, so its share is at most
            :math:`b` at any point, the end of the run included (up to an error in that
            estimate). The spacing (a multiple of ``every``) widens by itself where a
            measurement costs many steps (small full-batch models, a large probe set in a
            minibatch run); after the first measurement :attr:`note` (printed in a trainer
            run, and with ``verbose``) says how far, with the steps it expects to measure.
            Step 0 is always measured. ``None``: every due step, whatever it costs. With a
            budget, which steps get measured depends on timing; the values measured at a step
            do not. **Warm-up**: before its first measurement (and the first after a resume)
            the tracker takes one gradient and one Hessian-vector product untimed for the
            budget (allocation, autograd graphs, compiled kernels, caches), kept as
            ``warmup_seconds``; the run's seconds in the budget leave it out too.
        process_group: whose data the probe set is (the curvature operators' convention).
            ``None`` (the default): the default group when ``torch.distributed`` is initialized
            with more than one process, else this process alone; a ``ProcessGroup``: that
            group; ``"local"``: this process's data only. Under a group ``probe`` (and
            ``batch``) are this rank's shards: every row is that of the union of the ranks'
            shards (weighted by their sizes), the same on every rank; the ranks measure the
            same due steps (under a budget: from the largest clock of the ranks) and the
            group's rank 0 alone writes the rows to ``path`` and prints them. Every rank of
            the group must call :meth:`should_measure` and :meth:`record` at the same steps
            (they are collectives). In a trainer run the probe set (``None``: drawn from the
            training set) is split over the ranks of the group, as ``tensor_split`` does.

    Attributes:
        rows: the recorded rows (dicts), in order.
        seconds, matvecs: the total cost so far (wall-clock seconds, Hessian-vector products),
            the warm-up left out.
        warmup_seconds: the warm-up's seconds (outside the budget and :attr:`seconds`).
        note: after the first measurement under a budget that will leave due steps out, what
            a measurement costs and how often the budget lets it measure; else None.
    """

    def __init__(
        self,
        probe: Any = None,
        loss_fn: LossFn | None = None,
        every: int | None = None,
        *,
        path: str | Path | None = None,
        rho: float | None = None,
        tol: float = 1e-3,
        max_iter: int = 100,
        k: int = 1,
        probe_size: int = 4096,
        seed: int = 0,
        params: Sequence[Tensor] | None = None,
        preconditioned: bool | str = "auto",
        verbose: bool = False,
        effective: bool | str = "auto",
        budget: float | None | str = "auto",
        process_group: Any = None,
    ) -> None:
        if budget == "auto":  # the rule: an explicit every alone means every `every` steps
            budget = DEFAULT_BUDGET if every is None else None
        if every is None:
            every = DEFAULT_EVERY
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every: {every!r} (allowed: an integer >= 1)")
        if rho is not None and not (isinstance(rho, (int, float)) and rho >= 0):
            raise ValueError(f"Invalid rho: {rho!r} (allowed: None or a number >= 0)")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"Invalid tol: {tol!r} (allowed: a number > 0)")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"Invalid max_iter: {max_iter!r} (allowed: an integer >= 1)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k: {k!r} (allowed: an integer >= 1)")
        if preconditioned not in ("auto", True, False):
            raise ValueError(f"Invalid preconditioned: {preconditioned!r} (allowed: auto, True, "
                             "False)")
        if effective not in ("auto", True, False):
            raise ValueError(f"Invalid effective: {effective!r} (allowed: auto, True, False)")
        if budget is not None and (isinstance(budget, bool) or not isinstance(
                budget, (int, float)) or not 0 < budget <= 1):
            raise ValueError(f"Invalid budget: {budget!r} (allowed: 'auto', None or a number "
                             "in (0, 1])")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn: {loss_fn!r} (allowed: a callable (output, y))")
        _check_group(process_group)
        self.probe = None if probe is None else _batches(probe)
        self.loss_fn = loss_fn
        self.every = every
        self.path = None if path is None else Path(path)
        self.rho = rho
        self.tol = float(tol)
        self.max_iter = max_iter
        self.k = k
        self.probe_size = probe_size
        self.seed = seed
        self.params = None if params is None else list(params)
        self.preconditioned = preconditioned
        self.verbose = verbose
        self.effective = effective
        self.budget = None if budget is None else float(budget)
        self.process_group = process_group  # resolved at each use (the group may come later)
        self.rows: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.matvecs = 0
        self.warmup_seconds = 0.0  # outside the budget
        self.note: str | None = None
        self.skipped = 0  # due measurements left out to stay within the budget
        self._cold = True  # the warm-up is still to be done (in this process)
        self._note_printed = False
        self._steps_seen: tuple[int, int] | None = None  # (first, last) step asked
        self._clock: float | None = None  # when the tracker saw its first step
        self._elapsed_before = 0.0  # run seconds before a resume
        self._last_end: float | None = None  # when the last measurement ended
        self._skipped_step: int | None = None  # the last due step left out
        self._vector: Tensor | None = None  # the last v₁, the next Lanczos start
        self._pvector: Tensor | None = None  # the same for P⁻¹H (Adam)
        self._evector: Tensor | None = None  # the same for the effective Hessian
        self._file_started = False

    # ------------------------------------------------------------------ plain-loop interface

    def due(self, step: int) -> bool:
        """Whether ``step`` is a measurement step (0, every, 2·every, ...)."""
        return step % self.every == 0

    def elapsed(self) -> float:
        """Seconds of the run since the tracker saw its first step (across resumes)."""
        if self._clock is None:
            return self._elapsed_before
        return self._elapsed_before + time.perf_counter() - self._clock

    def run_seconds(self) -> float:
        """The run's seconds the budget is a share of: :meth:`elapsed` without the warm-up."""
        return self.elapsed() - self.warmup_seconds

    def should_measure(self, step: int) -> bool:
        """Whether to measure at ``step``: it is due, not measured yet, and within the
        ``budget`` (its two conditions are in the class docstring). Call it at every step (it
        starts the run's clock); a due step left out is counted in :attr:`skipped`."""
        now = time.perf_counter()
        if self._clock is None:
            self._clock = now
        first = step if self._steps_seen is None else self._steps_seen[0]
        self._steps_seen = (first, step)
        if not self.due(step) or self._has_row(step):
            return False
        if self.budget is None or not self.rows or self._last_end is None:
            return True
        b = self.budget
        # the rows (their seconds) are the same on every rank; the clocks are not: every
        # rank decides from the largest of the ranks' (one all-reduce), so all decide alike
        since, run = _largest(self._group(), [now - self._last_end, self.run_seconds()])
        last = float(self.rows[-1].get("seconds", 0.0))
        estimate = max(float(r.get("seconds", 0.0)) for r in self.rows[-3:])
        paced = since >= last * (1.0 - b) / b
        within = self.seconds + estimate <= b * (run + estimate)
        if paced and within:
            return True
        if self._skipped_step != step:  # a step may be asked twice (epoch end, step start)
            self.skipped += 1
            self._skipped_step = step
            if self.skipped == 1:
                self.note = self._projection(step, last, run)
                if self.verbose and self.note and self._writes():
                    print(self.note, flush=True)
        return False

    def _projection(self, step: int, cost: float, run: float) -> str | None:
        """What the budget does to ``every``, told at the first due step it leaves out: a
        measurement's cost in seconds and in training steps, the spacing the budget allows."""
        first, _ = self._steps_seen or (step, step)
        steps = step - first
        train = run - self.seconds
        if steps <= 0 or train <= 0 or self.budget is None:
            return None
        per_step = train / steps
        b, k = self.budget, self.every
        spacing = max(k, k * math.ceil(cost * (1.0 - b) / b / per_step / k))
        share = cost / (cost + k * per_step)
        return (f"edge tracker: a measurement costs {cost:.3g} s, about {cost / per_step:.0f} "
                f"training steps; within the {100 * b:g} % budget it measures about every "
                f"{spacing} steps instead of every {k} (budget=None: every {k} steps, about "
                f"{100 * share:.0f} % of the run's time)")

    def maybe_record(
        self, step: int, model: nn.Module, optimizer: Optimizer, batch: Any = None,
        probe: Any = None,
    ) -> dict[str, Any] | None:
        """:meth:`record` if :meth:`should_measure` at ``step``, else ``None``."""
        if not self.should_measure(step):
            return None
        return self.record(step, model, optimizer, batch, probe)

    def record(
        self, step: int, model: nn.Module, optimizer: Optimizer, batch: Any = None,
        probe: Any = None,
    ) -> dict[str, Any]:
        """Measure at the model's weights :math:`w` and append a row (see the module docstring);
        under an optimizer that holds :math:`w + ε` between steps (MSAM), inside its
        ``at_weights()``.

        Args:
            step: the step number written in the row.
            model: the network, in the mode the measurement should use (the tracker never
                changes it; in training mode dropout masks are fixed per measurement); a
                ``DistributedDataParallel`` model is measured through its module. FSDP2
                (``fully_shard``) models are refused.
            optimizer: the optimizer in use: its kind and current hyperparameters decide the edge.
            batch: in minibatch runs, the step's ``(x, y)``: the SAM-edge then uses the gradient
                norm on this batch (the ‖g‖ the SAM step normalizes by), recorded as
                ``batch_grad_norm``; λ₁ is still that of the probe set.
            probe: measure on this ``(x, y)`` (or list of batches) instead of the tracker's
                probe set, for this row only: e.g. the step's own minibatch, as Long & Bartlett
                measure their language model (the SAM-edge then uses its ‖g‖ too).
        """
        from samkit.optim.onepass import at_weights

        with at_weights(optimizer):
            return self._record(step, model, optimizer, batch, probe)

    def _record(self, step: int, model: nn.Module, optimizer: Optimizer, batch: Any,
                probe: Any) -> dict[str, Any]:
        probe = self.probe if probe is None else _batches(probe)
        if probe is None or self.loss_fn is None:
            raise ValueError(
                "EdgeTracker has no probe set or loss_fn: pass EdgeTracker(probe=(x, y), "
                "loss_fn=...) outside a trainer"
            )
        from samkit.curvature._dist import has_dtensors, unwrap

        model = unwrap(model)  # a DDP model is measured through its module (no DDP hooks)
        params = self._params(model)
        if has_dtensors(params):
            raise ValueError(
                "Invalid model: FSDP2 (fully_shard) parameters; the edge tracker measures "
                "plain and DDP models (its gradient and alignments are taken on full "
                "parameters); measure an FSDP2 model with samkit.curvature's operators")
        if self._cold:  # outside the budget and the row's seconds
            self._warm_up(model, params, probe)
        start = time.perf_counter()
        kind = optimizer_kind(optimizer)  # what the optimizer declares

        # 1. loss and gradient on the probe set (under a process group: over the union of the
        #    ranks' shards, the same on every rank)
        loss, grad = self._loss_grad(model, params, probe)
        grad_norm = float(grad.norm())
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            row = {"step": int(step), "loss": loss, "grad_norm": grad_norm, "diverged": True}
            return self._append(row, start, 0)

        # 2. λ₁ and v₁ by Lanczos, started from the last v₁, on the Hessian of the probe set
        #    (of the union of the shards: one all-reduce per product)
        H = self._operator(model, params, probe)
        from samkit.optim.kind import BaseRule, EdgeRule

        effective = self.effective is not False and kind.form.wraps
        # an isotropic ascent's (SAM's, USAM's) λ_max(H_eff) comes from this run's space: the
        # residual of f(θ) = θ + cθ² is at most (1 + 2cθ)/(1 + cθ) < 2 times θ's relative one,
        # so λ₁ is taken to tol/2 for H_eff's pair to meet tol
        polynomial = (effective and kind.edge is EdgeRule.CLOSED_FORM
                      and kind.ascent.isotropic)
        top = self._top(H, self._vector, keep_basis=effective,
                        tol=self.tol / 2 if polynomial else self.tol)
        self._vector = top.vectors.detach().clone()
        lam, vec, matvecs, converged = float(top.values[0]), self._vector[:, 0], top.matvecs, \
            top.converged

        # 3. the edge for this optimizer; for Adam the preconditioned sharpness
        edge_norm = grad_norm
        row: dict[str, Any] = {"step": int(step), "loss": loss, "grad_norm": grad_norm}
        if batch is not None:
            _, batch_grad = self._loss_grad(model, params, _batches(batch))
            edge_norm = float(batch_grad.norm())
            row["batch_grad_norm"] = edge_norm
        row["lambda1"] = lam
        if self.k > 1:
            row["eigenvalues"] = [float(v) for v in top.values]
        row["error_bound"] = float(top.error_bounds.max())
        edge = edge_for(kind, edge_norm)
        sharpness = lam
        P, plam = None, None  # Adam's preconditioner, once it exists
        use_pre = self.preconditioned is True or (
            self.preconditioned == "auto" and kind.base.rule is BaseRule.ADAM
        )
        if use_pre:
            from samkit.curvature import adam_preconditioned

            base = optimizer.base_optimizer if kind.form.wraps else optimizer
            if all(len(base.state.get(p, {})) for p in params):
                P = adam_preconditioned(H, base)
                ptop = self._top(P, self._pvector)
                self._pvector = ptop.vectors.detach().clone()
                plam = float(ptop.values[0])
                matvecs += ptop.matvecs
                converged = converged and ptop.converged
                sharpness = plam
            else:  # before Adam's first step there is no preconditioner yet
                plam, sharpness = None, None
            row["lambda1_precond"] = plam

        # 3b. the effective Hessian of the sharpness-aware step against the base edge; the
        # ascent's form (rho M / c per coordinate) also gives its eps for step 4
        Heff, why = self._effective_operator(H, optimizer, kind, grad)
        adam = kind.base.rule is BaseRule.ADAM
        if adam and P is None:  # Adam's edge is for P^-1 H_eff only
            lam_eff, eff_matvecs, eff_converged = None, 0, True
        else:
            lam_eff, eff_matvecs, eff_converged = self._effective(
                H, Heff, why, P if adam else None, top)
        matvecs += eff_matvecs
        converged = converged and eff_converged
        base_edge = base_edge_for(kind)
        row["lambda_eff"] = lam_eff
        row["base_edge"] = base_edge
        row["eff_ratio"] = (
            None if lam_eff is None or not base_edge else lam_eff / base_edge
        )
        row["edge"] = edge
        row["edge_kind"] = kind.label
        row["ratio"] = None if edge is None or edge == 0 or sharpness is None else sharpness / edge
        lr = kind.base.lr
        row["gd_edge"] = float(stability.gd_edge(lr)) if lr > 0 else None
        row["lr"] = lr
        rho = kind.rho if kind.rho is not None else self.rho
        row["rho"] = rho

        # 4. alignment of the plain and the sharpness-aware gradient with v₁: the gradient at
        # w + eps, eps the optimizer's ascent's (eps = (rho M / c) g from its effective form); a
        # step without a perturbation (plain, loss-term) is compared with SAM's at the tracker's
        # rho; an ascent without a form (or a one-pass step) gives None
        row["align_grad"] = _alignment(grad, vec)
        row["align_sam_grad"] = None
        eps = None
        if Heff is not None:
            eps = Heff.scale.to(grad.dtype) * grad
        elif kind.ascent is None and not kind.form.perturbs and rho is not None:
            eps = grad * (rho / grad_norm) if grad_norm > 0 else torch.zeros_like(grad)
        if eps is not None:
            _, sam_grad = self._loss_grad(model, params, probe, shift=eps)
            row["align_sam_grad"] = _alignment(sam_grad, vec)
        row["converged"] = bool(converged)
        return self._append(row, start, matvecs)

    # ------------------------------------------------------------------ cost

    def cost(self) -> dict[str, float]:
        """``{"rows", "seconds", "matvecs", "seconds_per_row", "matvecs_per_row", "skipped",
        "share", "warmup_seconds"}`` (``share``: the tracker's seconds over the run's so far,
        the warm-up left out of both)."""
        n = len(self.rows)
        elapsed = self.run_seconds()
        return {
            "rows": n,
            "seconds": self.seconds,
            "matvecs": self.matvecs,
            "seconds_per_row": self.seconds / n if n else 0.0,
            "matvecs_per_row": self.matvecs / n if n else 0.0,
            "skipped": self.skipped,
            "share": self.seconds / elapsed if elapsed > 0 else 0.0,
            "warmup_seconds": self.warmup_seconds,
        }

    def cost_summary(self) -> str:
        """One line: how many measurements, their time and Hessian-vector products, the share
        of the run, and the due steps left out to stay within the budget."""
        c = self.cost()
        line = (
            f"edge tracker: {c['rows']} measurements, {c['seconds']:.1f} s "
            f"({c['seconds_per_row']:.2f} s each), {c['matvecs']} Hessian-vector products "
            f"({c['matvecs_per_row']:.1f} each), {100 * c['share']:.0f} % of the run"
            f" (+ {c['warmup_seconds']:.1f} s warm-up, outside the budget)"
        )
        if self.budget is None:
            line += f"; every {self.every} steps, no budget"
        else:
            line += (f"; {c['skipped']} due steps left out to stay within "
                     f"{100 * self.budget:g} %")
        return line

    # ------------------------------------------------------------------ trainer callback

    def on_train_start(self, state: TrainState) -> None:
        if self.loss_fn is None:
            self.loss_fn = state.loss_fn
        if self.probe is None:
            self.probe = self._default_probe(state.train_data)
            group = self._group()
            if group is not None:  # this rank's shard of the probe set
                self.probe = _shard(self.probe, *_rank_world(group))
        if self.path is None:
            self.path = Path(state.run_dir) / "edge.jsonl"
        self._clock = time.perf_counter()
        if state.resumed:
            # keep what was measured up to the checkpoint, drop what came after it (the
            # writer's file, handed to every rank: the rows seed the next measurements)
            kept = None
            if self._writes() and self.path.exists():
                kept = [r for r in _read_rows(self.path) if r.get("step", 0) <= state.step]
                _write_rows(self.path, kept)
            kept = _from_writer(self._group(), kept)
            if kept is not None:
                self.rows = kept
                self._file_started = True

    def _record_in_run(self, state: TrainState, step: int, batch: Any = None) -> None:
        """Measure, and log the row to the run's ``metrics.jsonl`` as ``{"event": "edge",
        ...}`` (besides ``edge.jsonl``); the budget's note, once, as a progress line."""
        row = self.record(step, state.model, state.optimizer, batch)
        state.log({"event": "edge", **row})

    def _told(self, state: TrainState) -> None:
        if self.note is not None and not self._note_printed:
            self._note_printed = True
            state.print(f"note: {self.note}")

    def on_step_start(self, state: TrainState, step: int) -> None:
        # at w_step, before step `step`, with the batch that step uses: as in a plain loop
        if self.should_measure(step):
            self._record_in_run(state, step, _step_batch(state))
        self._told(state)

    def on_epoch_end(self, state: TrainState, epoch: int, metrics: dict[str, Any]) -> None:
        # full batch: the next step's measurement (batch=None) can be taken now, for the record
        if _step_batch(state) is None and self.should_measure(state.step):
            self._record_in_run(state, state.step)
        if self.rows and "lambda1" in self.rows[-1]:
            metrics["lambda1"] = self.rows[-1]["lambda1"]
            if self.rows[-1].get("ratio") is not None:
                metrics["edge_ratio"] = self.rows[-1]["ratio"]

    def on_train_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        if self.should_measure(state.step):  # the final weights
            self._record_in_run(state, state.step)
        self._told(state)
        state.print(self.cost_summary())

    def _has_row(self, step: int) -> bool:
        return bool(self.rows) and self.rows[-1].get("step") == step

    def state_dict(self) -> dict[str, Any]:
        return {"vector": self._vector, "pvector": self._pvector, "seconds": self.seconds,
                "matvecs": self.matvecs, "evector": self._evector, "elapsed": self.elapsed(),
                "skipped": self.skipped, "warmup_seconds": self.warmup_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._vector = state.get("vector")
        self._pvector = state.get("pvector")
        self._evector = state.get("evector")
        self.seconds = float(state.get("seconds", 0.0))
        self.matvecs = int(state.get("matvecs", 0))
        self._elapsed_before = float(state.get("elapsed", 0.0))
        self.skipped = int(state.get("skipped", 0))
        self.warmup_seconds = float(state.get("warmup_seconds", 0.0))
        self._cold = True  # a new process warms up again
        self._clock = self._last_end = None  # after a resume: measure at the first due step

    # ------------------------------------------------------------------ internals

    def _warm_up(self, model: nn.Module, params: list[Tensor], probe: list[tuple[Any, Any]]
                 ) -> None:
        """One gradient and one Hessian-vector product on ``probe``, timed as
        :attr:`warmup_seconds` (outside the budget): the one-time costs of a first measurement
        (allocation, autograd graphs, compiled kernels, caches) do not count as a measurement's
        cost and do not space the next ones."""
        t0 = time.perf_counter()
        self._cold = False
        _, grad = self._loss_grad(model, params, probe)
        if bool(torch.isfinite(grad).all()):  # the same on every rank (reduced)
            H = self._operator(model, params, probe)
            H @ torch.ones(H.shape[0], device=H.device, dtype=H.dtype)
        self.warmup_seconds += time.perf_counter() - t0

    def _default_probe(self, split: Any) -> list[tuple[Tensor, Tensor]]:
        x, y = split.x, split.y
        n = len(y)
        if n > self.probe_size:
            gen = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(n, generator=gen)[: self.probe_size].sort().values
            idx = idx.to(y.device)
            x, y = x[idx], y[idx]
        return [(x, y)]

    def _params(self, model: nn.Module) -> list[Tensor]:
        if self.params is not None:
            return self.params
        return [p for p in model.parameters() if p.requires_grad]

    def _group(self) -> Any:
        """The resolved process group (None: this process alone)."""
        from samkit.curvature._dist import resolve_group

        return resolve_group(self.process_group)

    def _writes(self) -> bool:
        """Whether this process writes the rows: the group's rank 0 (without a group, global
        rank 0, so that ``"local"`` trackers of a torchrun run write once too)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return True
        group = self._group()
        return dist.get_rank(group) == 0 if group is not None else dist.get_rank() == 0

    def _operator(self, model: nn.Module, params: list[Tensor], batches: list[tuple[Any, Any]]
                  ) -> Any:
        """The Hessian of the mean loss over ``batches`` (under the tracker's process group:
        over the union of the ranks' ``batches``, one all-reduce per product)."""
        from samkit.curvature import HessianOperator

        # one batch is passed as (x, y): the operator then caches its gradient graph
        # (x may be a dict of tensors, e.g. a Hugging Face batch: then a list of one batch)
        return HessianOperator(model, self.loss_fn, _operator_data(batches), params=params,
                               seed=self.seed, process_group=self.process_group)

    def _loss_grad(
        self, model: nn.Module, params: list[Tensor], batches: list[tuple[Any, Any]],
        shift: Tensor | None = None,
    ) -> tuple[float, Tensor]:
        r"""Mean loss and flat gradient over ``batches`` at ``w + shift``: the operator base's
        :func:`~samkit.curvature.operator.loss_and_gradient` (the weights are put back
        exactly and ``.grad`` is not touched). Under a process group, of the union of the
        ranks' ``batches``: :math:`\sum_r n_r L_r / \sum_r n_r` and the same for the
        gradient, one all-reduce (in float64) of :math:`(n_r g_r, n_r L_r, n_r)`, the same
        on every rank (``shift`` must be too)."""
        from samkit.curvature._data import Batches
        from samkit.curvature.operator import loss_and_gradient

        loss, grads = loss_and_gradient(model, self.loss_fn, params,
                                        Batches(batches, params[0].device), self.seed, shift)
        grad = _flat(grads).detach()
        group = self._group()
        if group is None:
            return loss, grad
        import torch.distributed as dist

        sizes = [_examples(x, y) for x, y in batches]
        if None in sizes:
            raise ValueError(
                "Invalid probe: the number of examples of a batch cannot be told (allowed "
                "under a process group: batches whose y, or x, has the examples along its "
                "first dimension; the ranks' losses are weighted by them)")
        n = float(sum(sizes))
        packed = torch.cat([grad.to(torch.float64) * n,
                            torch.tensor([loss * n, n], dtype=torch.float64, device=grad.device)])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        total = packed[-1]
        return float(packed[-2] / total), (packed[:-2] / total).to(grad.dtype)

    def _effective_operator(self, H: Any, optimizer: Optimizer, kind: Any, grad: Tensor):
        """The effective Hessian of the optimizer's ascent (its declared form) and ''; or None
        and why there is none (no ascent, no form, a probe over other parameters)."""
        from samkit.curvature import effective_hessian
        from samkit.optim.ascents import effective_note

        if not kind.form.wraps:
            return None, ""  # a plain optimizer: its effective Hessian is H itself
        if kind.ascent is None:
            return None, f"{kind.name} declares no ascent"
        why = effective_note(optimizer)
        if why:
            return None, why
        try:
            return effective_hessian(H, optimizer, grad=grad), ""
        except ValueError as e:  # e.g. a probe over other parameters than the optimizer's
            return None, str(e)

    def _effective(self, H: Any, Heff: Any, why: str, P: Any, krylov: Any):
        r"""λ_max of the effective Hessian ``Heff`` (of :math:`D H_\mathrm{eff} D` with Adam's
        preconditioner), its products and whether it converged; ``(None, 0, True)`` when the
        optimizer has none (``why``) or ``effective`` is off (``effective=True`` raises then).
        ``krylov``: λ₁'s Lanczos run on ``H`` (with its basis), whose space gives SAM's and
        USAM's pair for one product."""
        from samkit.curvature import PreconditionedOperator
        from samkit.curvature.effective import effective_top_on_krylov, is_polynomial_in_h

        if self.effective is False or Heff is None:
            if self.effective is True and Heff is None and why:
                raise ValueError(f"Invalid optimizer for effective=True: {why}")
            return None, 0, True
        before = H.matvecs
        start = self._evector
        if P is None and krylov is not None and krylov.basis is not None:
            pair = effective_top_on_krylov(Heff, krylov, self.tol)
            if pair.converged and is_polynomial_in_h(Heff):
                self._evector = pair.vectors.detach().clone()
                return float(pair.values[0]), H.matvecs - before, True
            start = pair.vectors  # the best start there is for Lanczos on H_eff
        if P is not None:
            Heff = PreconditionedOperator(Heff, P.scale)
        top = self._top(Heff, start)
        self._evector = top.vectors.detach().clone()
        return float(top.values[0]), H.matvecs - before, bool(top.converged)

    def _top(self, H: Any, init: Tensor | None, keep_basis: bool = False,
             tol: float | None = None) -> Any:
        """The top ``k`` eigenpairs of ``H``: block Lanczos from the last top vectors **and**
        one fresh random direction per measurement (a block of ``k + 1``), so an eigenvalue
        that has overtaken the warm-started one is found; ``converged`` is Lanczos' honest
        residual test (see :func:`~samkit.curvature.top_eigenvalues`)."""
        import warnings

        from samkit.curvature import top_eigenvalues

        d = H.shape[0]
        if init is not None:
            init = init.reshape(d, -1) if init.numel() % d == 0 else None
        if init is not None and not bool(torch.isfinite(init).all()):
            init = None
        if init is not None:
            init = init[:, : self.k]
        with warnings.catch_warnings():  # a non-converged row says so in its "converged"
            warnings.simplefilter("ignore", UserWarning)
            return top_eigenvalues(
                H, k=min(self.k, d), tol=self.tol if tol is None else tol, method="lanczos",
                which="LA",
                max_iter=max(self.max_iter, self.k), seed=self.seed + len(self.rows),
                init=init, block_size=min(d, self.k + 1) if init is not None else None,
                keep_basis=keep_basis,
            )

    def _append(self, row: dict[str, Any], start: float, matvecs: int) -> dict[str, Any]:
        # the row's seconds: the largest of the ranks' (the same row, and the same budget
        # decisions, on every rank)
        (seconds,) = _largest(self._group(), [time.perf_counter() - start])
        self._last_end = time.perf_counter()
        self.seconds += seconds
        self.matvecs += matvecs
        row["matvecs"] = int(matvecs)
        row["seconds"] = seconds
        self.rows.append(row)
        if not self._writes():
            return row
        if self.path is not None:
            if not self._file_started:
                _write_rows(self.path, [])
                self._file_started = True
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        if self.verbose:
            print(format_row(row), flush=True)
        return row


def _check_group(process_group: Any) -> None:
    """``process_group`` is None, ``"local"`` or a ``torch.distributed.ProcessGroup`` (resolved
    at each use: a trainer joins its group after the tracker is made)."""
    import torch.distributed as dist

    if process_group is None or process_group == "local":
        return
    if dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        return
    raise ValueError(f"Invalid process_group: {process_group!r} (allowed: None, a "
                     "torch.distributed.ProcessGroup, or 'local')")


def _rank_world(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def _largest(group: Any, values: list[float]) -> list[float]:
    """The largest of each value over the ranks of ``group`` (one all-reduce; the values
    themselves without a group)."""
    if group is None:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [float(v) for v in t.cpu()]


def _from_writer(group: Any, rows: list[dict[str, Any]] | None) -> Any:
    """``rows`` of the group's rank 0, on every rank (one broadcast; as given without one)."""
    if group is None:
        return rows
    import torch.distributed as dist

    box = [rows]
    dist.broadcast_object_list(box, group_src=0, group=group)
    return box[0]


def _shard(probe: list[tuple[Any, Any]], rank: int, world: int) -> list[tuple[Any, Any]]:
    """This rank's part of every batch of ``probe`` (contiguous, sizes differing by at most
    one: :func:`samkit.distributed.shard_batch`). When a batch has fewer examples than there
    are ranks, every rank keeps the whole probe set (the size-weighted mean over identical
    copies is the probe set's own)."""
    if any(len(y) < world for _, y in probe):
        return probe
    return [(x.tensor_split(world)[rank], y.tensor_split(world)[rank]) for x, y in probe]


def _operator_data(probe: list[tuple[Any, Any]]) -> Any:
    """One batch is passed as ``(x, y)``: the operator then caches its gradient graph (``x``
    may be a dict of tensors, e.g. a Hugging Face batch: then a list of one batch)."""
    return probe[0] if len(probe) == 1 and isinstance(probe[0][0], Tensor) else probe


def _step_batch(state: TrainState) -> Any:
    """The step's batch for the SAM-edge's ‖g‖ (under DDP this rank's slice of it: the
    tracker measures the union of the slices), or None in full-batch runs (the probe set is
    then the training set)."""
    batch = state.batch
    if batch is None or state.full_batch:
        return None
    return batch


def _alignment(g: Tensor, v: Tensor) -> float:
    norm = float(g.norm())
    if norm == 0.0:
        return 0.0
    return abs(float(torch.dot(g.to(v.dtype), v))) / (norm * float(v.norm()))


# What the framework callbacks log of a row, always all four (NaN where a row has no value:
# no edge applies to the optimizer, or Adam has no preconditioner yet), and the effective
# Hessian's pair where the row has it.
LOGGED_KEYS = ("lambda1", "edge", "ratio", "grad_norm")
EFFECTIVE_KEYS = ("lambda_eff", "base_edge", "eff_ratio")


def logged_metrics(row: dict[str, Any], prefix: str = "edge/") -> dict[str, float]:
    """``{prefix + key: value}`` of a row for a framework's logger: ``lambda1``, ``edge``,
    ``ratio`` and ``grad_norm`` always (NaN where the row has none), ``lambda_eff``,
    ``base_edge`` and ``eff_ratio`` where it has them."""
    out = {f"{prefix}{key}": math.nan if row.get(key) is None else float(row[key])
           for key in LOGGED_KEYS}
    out.update({f"{prefix}{key}": float(row[key]) for key in EFFECTIVE_KEYS
                if row.get(key) is not None})
    return out


def no_edge_reason(optimizer: Optimizer) -> str | None:
    """Why no closed-form edge applies to ``optimizer`` (None when one does)."""
    kind = optimizer_kind(optimizer)
    if edge_for(kind, 1.0) is not None:
        return None
    return kind.note or f"no closed-form edge for {kind.name}"


def format_row(row: dict[str, Any]) -> str:
    """One human line for a tracker row."""
    parts = [f"step {row['step']:>5d}", f"loss {row['loss']:.4f}", f"|g| {row['grad_norm']:.4f}"]
    if row.get("diverged"):
        return "  ".join(parts + ["diverged"])
    parts.append(f"lambda1 {row['lambda1']:.3f}")
    if row.get("lambda1_precond") is not None:
        parts.append(f"lambda1(P^-1 H) {row['lambda1_precond']:.3f}")
    if row.get("edge") is not None:
        parts.append(f"edge {row['edge']:.3f} ({row['edge_kind']})")
        if row.get("ratio") is not None:  # None: Adam before its preconditioner exists
            parts.append(f"ratio {row['ratio']:.3f}")
    if row.get("lambda_eff") is not None:
        parts.append(f"lambda_eff {row['lambda_eff']:.3f}")
        if row.get("eff_ratio") is not None:
            parts.append(f"/ base edge {row['base_edge']:.3f} = {row['eff_ratio']:.3f}")
    parts.append(f"align {row['align_grad']:.2f}")
    if row.get("align_sam_grad") is not None:
        parts.append(f"sam-align {row['align_sam_grad']:.2f}")
    parts.append(f"{row['matvecs']} Hv {row['seconds']:.2f} s")
    return "  ".join(parts)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    from samkit.train.checkpoint import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_edge_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an ``edge.jsonl`` file (or of ``<run dir>/edge.jsonl``)."""
    path = Path(path)
    return _read_rows(path / "edge.jsonl" if path.is_dir() else path)
