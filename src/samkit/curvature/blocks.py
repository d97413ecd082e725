r"""Per-block spectra: the top eigenvalues of each diagonal block of a curvature operator.

Split the parameters into blocks :math:`w = (w_1, \dots, w_B)` (one per module, per parameter
group, or any named sets). The diagonal block of :math:`A` (Hessian, GGN, Fisher, ...) for
block :math:`b` is

.. math::
    A_{bb} = E_b^\top A\, E_b ,

with :math:`E_b` the embedding of block :math:`b`'s coordinates into all of them: for the
Hessian, the Hessian of the loss with respect to :math:`w_b` alone, every other parameter
held fixed. :func:`block_spectra` returns :math:`\lambda_1 \ge \dots \ge \lambda_k` of every
:math:`A_{bb}` in one call, by samkit's Lanczos (:func:`~samkit.curvature.top_eigenvalues`),
with each block's ``converged`` flag. The eigenvalues of the blocks are not those of
:math:`A`: by Cauchy's interlacing theorem :math:`\lambda_1(A_{bb}) \le \lambda_1(A)`, with
equality only when a top eigenvector of :math:`A` lies in block :math:`b`.

References:
    Z. Yao, A. Gholami, K. Keutzer, M. W. Mahoney. PyHessian: Neural Networks Through the Lens
    of the Hessian. IEEE BigData 2020 (layer-wise spectra; PyHessian issue #10 asks for them).
    B. N. Parlett. The Symmetric Eigenvalue Problem, ch. 10 (interlacing).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from samkit.curvature.eigen import top_eigenvalues
from samkit.curvature.operator import CurvatureOperator, LinearOperator
from samkit.optim._validation import check_int

BLOCKS = ("module", "parameter")


@dataclass(frozen=True)
class BlockSpectrum:
    """The top eigenvalues of one diagonal block.

    Attributes:
        name: the block's name (a module's qualified name, a parameter's, a group's or the
            key given).
        kind: what the block is: a module's class name, ``"parameter"``, ``"group"`` or
            ``"block"`` (a dict entry).
        params: the names of the parameters in the block, in the operator's order.
        dim: the block's size (entries of its parameters).
        values: ``(min(k, dim),)`` float64, largest first.
        error_bounds: ``(min(k, dim),)`` float64, the bounds on each value's error.
        converged: whether every value met ``tol`` (see :func:`top_eigenvalues`).
        matvecs: the block's products (each a product restricted to the block).
    """

    name: str
    kind: str
    params: tuple[str, ...]
    dim: int
    values: Tensor
    error_bounds: Tensor
    converged: bool
    matvecs: int


@dataclass(frozen=True)
class BlockSpectra:
    """The spectra of every block, in order; iterate over it, index it by position or name.

    Attributes:
        blocks: the :class:`BlockSpectrum` of each block.
        k: the eigenvalues asked for per block.
        tol: the relative tolerance asked for.
    """

    blocks: tuple[BlockSpectrum, ...]
    k: int
    tol: float
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {b.name: i for i, b in enumerate(self.blocks)})

    @property
    def converged(self) -> bool:
        """Whether every block converged."""
        return all(b.converged for b in self.blocks)

    @property
    def matvecs(self) -> int:
        """The products of all blocks."""
        return sum(b.matvecs for b in self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[BlockSpectrum]:
        return iter(self.blocks)

    def __getitem__(self, key: int | str) -> BlockSpectrum:
        if isinstance(key, str):
            if key not in self._index:
                raise KeyError(f"no block named {key!r} (blocks: {', '.join(self._index)})")
            return self.blocks[self._index[key]]
        return self.blocks[key]

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per block: ``block``, ``kind``, ``dim``, ``lambda_1`` ... ``lambda_k``
        (``None`` where the block has fewer than ``k`` dimensions), ``converged``,
        ``matvecs`` (for a DataFrame or a CSV writer)."""
        rows = []
        for b in self.blocks:
            row: dict[str, Any] = {"block": b.name, "kind": b.kind, "dim": b.dim}
            for i in range(self.k):
                row[f"lambda_{i + 1}"] = float(b.values[i]) if i < len(b.values) else None
            row["converged"] = b.converged
            row["matvecs"] = b.matvecs
            rows.append(row)
        return rows

    def __str__(self) -> str:
        head = ["block", "dim", *(f"lambda_{i + 1}" for i in range(self.k)), "converged",
                "matvecs"]
        body = []
        for row in self.to_rows():
            label = row["block"] if row["kind"] in ("block", "group", "parameter") else (
                f"{row['block']} ({row['kind']})")
            values = ["-" if row[f"lambda_{i + 1}"] is None else f"{row[f'lambda_{i + 1}']:.6g}"
                      for i in range(self.k)]
            body.append([label, str(row["dim"]), *values,
                         "yes" if row["converged"] else "NO", str(row["matvecs"])])
        widths = [max(len(r[j]) for r in [head, *body]) for j in range(len(head))]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                             for j, (c, w) in enumerate(zip(cells, widths, strict=True)))

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(head), rule, *(line(r) for r in body)])


# -- which parameters make a block -------------------------------------------------------------


def _curvature_operator(H: Any) -> CurvatureOperator:
    """The curvature operator whose parameters index ``H``'s coordinates: ``H`` itself, or its
    base for an operator built on one (the effective Hessian, the Adam-preconditioned one)."""
    for op in (H, getattr(H, "base", None)):
        if isinstance(op, CurvatureOperator):
            if [tuple(s) for s in op.shapes] != [tuple(s) for s in H.shapes]:
                break
            return op
    raise ValueError(
        f"Invalid H: {type(H).__name__} (allowed: a curvature operator with parameters, such as "
        "HessianOperator, GGNOperator, a Fisher operator, or an operator built on one, such "
        "as effective_hessian(H, opt))"
    )


def _blocks(
    model: nn.Module, blocks: Any, names: list[str], params: list[Tensor]
) -> list[tuple[str, str, list[int]]]:
    """``(name, kind, indices into params)`` for each block, in order; empty blocks dropped."""
    index = {id(p): i for i, p in enumerate(params)}

    def indices(ps: Iterable[Any], what: str) -> list[int]:
        out: list[int] = []
        for j, p in enumerate(ps):
            if not isinstance(p, Tensor):
                raise ValueError(
                    f"Invalid blocks: {what} entry {j} is a {type(p).__name__} (allowed: "
                    "parameters of the operator)"
                )
            if id(p) not in index:
                raise ValueError(
                    f"Invalid blocks: {what} entry {j} (shape {tuple(p.shape)}) is not one of "
                    f"the operator's parameters (allowed: among {', '.join(names)})"
                )
            if index[id(p)] not in out:
                out.append(index[id(p)])
        return sorted(out)

    if isinstance(blocks, str):
        if blocks not in BLOCKS:
            raise ValueError(
                f"Invalid blocks: {blocks!r} (allowed: {', '.join(map(repr, BLOCKS))}, a dict "
                "name -> parameters or module, an optimizer or a list of parameter groups)"
            )
        if blocks == "parameter":
            return [(n, "parameter", [i]) for i, n in enumerate(names)]
        out, taken = [], set()
        for mname, module in model.named_modules():
            own = [index[id(p)] for p in module.parameters(recurse=False)
                   if id(p) in index and index[id(p)] not in taken]
            if own:
                taken.update(own)
                out.append((mname or "(root)", type(module).__name__, sorted(own)))
        return out
    if isinstance(blocks, torch.optim.Optimizer):
        blocks = blocks.param_groups
    if isinstance(blocks, Mapping):
        out = []
        for key, value in blocks.items():
            ps = value.parameters() if isinstance(value, nn.Module) else (
                [value] if isinstance(value, Tensor) else value)
            out.append((str(key), "block", indices(ps, f"block {key!r}")))
        return [b for b in out if b[2]] or _no_blocks(blocks)
    if isinstance(blocks, Sequence) and blocks and all(
        isinstance(g, Mapping) and "params" in g for g in blocks
    ):
        out = []
        for i, g in enumerate(blocks):
            ps = g["params"]
            ps = [ps] if isinstance(ps, Tensor) else ps
            out.append((str(g.get("name", f"group {i}")), "group", indices(ps, f"group {i}")))
        return [b for b in out if b[2]] or _no_blocks(blocks)
    raise ValueError(
        f"Invalid blocks: {type(blocks).__name__} (allowed: {', '.join(map(repr, BLOCKS))}, a "
        "dict name -> parameters or module, an optimizer or a list of parameter groups)"
    )


def _no_blocks(blocks: Any) -> list:
    raise ValueError(f"Invalid blocks: {len(blocks)} entries, none with a parameter of the "
                     "operator (allowed: at least one non-empty block)")


# -- the restricted operator ---------------------------------------------------------------------


def _restricted(H: CurvatureOperator, chosen: list[int]) -> CurvatureOperator:
    """``H`` with respect to ``H.params[chosen]`` only: the same model, loss, data, seeds and
    product, the other parameters held fixed. Its products are those of :math:`A_{bb}`
    directly (the backward passes stop at the block's parameters). The product strategies are
    copied (they hold per-instance state: the batched flag) and the graph cache starts empty.
    Under a process group the products stay those of the union (one all-reduce each); for an
    FSDP2 operator the block's vectors are held whole on every rank (the block's entries of
    the full weights the products run on), not in shards."""
    sub = copy.copy(H)
    LinearOperator.__init__(sub, [H.params[i].shape for i in chosen], H.dtype, H.device)
    sub.names = [H.names[i] for i in chosen]
    sub.params = [H.params[i] for i in chosen]
    sub.full_numels = [p.numel() for p in sub.params]
    sub.product = copy.copy(H.product)
    sub.fallback = copy.copy(H.fallback)
    sub.clear_cache()
    return sub


class _Embedded(LinearOperator):
    r""":math:`E_b^\top A E_b` for an operator that is not a curvature operator itself (the
    effective Hessian, the preconditioned Hessian): each product is one product of ``A``
    with the block's vector padded by zeros (``A.matvecs`` counts it), then cut back."""

    def __init__(self, A: Any, shapes: list[torch.Size], index: Tensor) -> None:
        if getattr(A, "sharding", None) is not None:
            raise ValueError(
                f"Invalid H: {type(A).__name__} on an FSDP2 model holds sharded vectors; "
                "block_spectra supports them for a curvature operator itself (HessianOperator, "
                "GGNOperator, a Fisher operator), not for an operator built on one"
            )
        super().__init__(shapes, A.dtype, A.device)
        self.A, self.index = A, index

    def _matvec(self, v: Tensor) -> Tensor:
        full = torch.zeros(self.A.shape[0], dtype=self.dtype, device=self.device)
        full[self.index] = v
        return (self.A @ full)[self.index]

    def _matmat(self, v: Tensor) -> Tensor:
        full = torch.zeros(self.A.shape[0], v.shape[1], dtype=self.dtype, device=self.device)
        full[self.index] = v
        self.matvecs += v.shape[1]
        return (self.A @ full)[self.index]


def block_spectra(
    H: Any,
    blocks: Any = "module",
    k: int = 3,
    tol: float = 1e-4,
    max_iter: int | None = None,
    seed: int = 0,
) -> BlockSpectra:
    r"""The top ``k`` eigenvalues of each diagonal block :math:`A_{bb} = E_b^\top A E_b` of a
    curvature operator, in one call, as a table.

    .. math::
        \lambda_1(A_{bb}) \ge \dots \ge \lambda_k(A_{bb}), \qquad
        A_{bb} = \nabla^2_{w_b} L(w) \text{ for the Hessian (other blocks held fixed)}

    Each block is solved by :func:`~samkit.curvature.top_eigenvalues` (block Lanczos, the
    same ``tol``, ``max_iter`` and ``seed`` for each; its stopping test and its
    ``converged`` flag, per block). A block with fewer than ``k`` dimensions gets all of its
    eigenvalues. For a :class:`~samkit.curvature.CurvatureOperator` (Hessian, GGN, Fisher)
    each product is taken with respect to the block's parameters only (the same model, loss,
    data, seeds and backend; the backward passes stop at the block); for an operator built on
    one (:func:`~samkit.curvature.effective_hessian`, :func:`adam_preconditioned`) it is a
    product of the whole operator with a vector that is zero off the block. Either way
    ``H.matvecs`` grows by the block products used.

    Under a process group (DDP, FSDP2: see :class:`~samkit.curvature.CurvatureOperator`)
    each block is that of the union of the ranks' data, and every rank returns the same
    table; an FSDP2 operator's blocks hold their vectors whole on every rank (a block's size
    per rank, not its shard). An operator built on an FSDP2 one is not supported
    (``ValueError``).

    Args:
        H: the operator.
        blocks: how to split the parameters of ``H``:

            * ``"module"`` (default): one block per module that holds parameters of ``H``
              directly (the leaf layers: ``Linear``, ``Conv2d``, ``LayerNorm``, ...), named
              by its qualified name;
            * ``"parameter"``: one block per parameter tensor;
            * a ``dict`` name -> parameters (a module, a tensor or an iterable of tensors);
              blocks may overlap;
            * a ``torch.optim.Optimizer`` or a list of parameter groups (``{"params": ...}``
              dicts, named by their ``"name"`` key when they have one, else ``group i``):
              one block per group.

            Parameters of ``H`` in no block are not measured; an entry that is not a
            parameter of ``H`` raises ``ValueError``.
        k: eigenvalues per block (>= 1).
        tol, max_iter, seed: as for :func:`~samkit.curvature.top_eigenvalues`.

    Returns:
        A :class:`BlockSpectra`: ``print(result)`` shows the table; ``result.to_rows()`` gives
        it as dicts; ``result["0"].values`` one block's eigenvalues; ``result.converged``.

    Example::

        H = HessianOperator(model.eval(), nn.CrossEntropyLoss(), (x, y))
        print(block_spectra(H, blocks="module", k=3))

    References:
        Z. Yao, A. Gholami, K. Keutzer, M. W. Mahoney. PyHessian: Neural Networks Through the
        Lens of the Hessian. IEEE BigData 2020.
    """
    k = check_int("k", k, 1)
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and 0 < tol < 1):
        raise ValueError(f"Invalid tol: {tol!r} (allowed: a number > 0 and < 1)")
    owner = _curvature_operator(H)
    names, params = list(owner.names), list(owner.params)
    # blocks name the model's own tensors (the shards under FSDP2, whose products run on
    # full copies, owner.params): matched by position
    chosen = _blocks(owner.model, blocks, names, list(owner.model_params))
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    results = []
    for name, kind, idx in chosen:
        if isinstance(H, CurvatureOperator):
            sub: Any = _restricted(H, idx)
        else:
            flat = torch.cat([torch.arange(offsets[i], offsets[i + 1], device=H.device)
                              for i in idx])
            sub = _Embedded(H, [params[i].shape for i in idx], flat)
        dim = sub.shape[0]
        top = top_eigenvalues(sub, k=min(k, dim), tol=tol, max_iter=max_iter, seed=seed)
        if isinstance(H, CurvatureOperator):
            H.matvecs += sub.matvecs
        results.append(BlockSpectrum(
            name=name, kind=kind, params=tuple(names[i] for i in idx), dim=dim,
            values=top.values, error_bounds=top.error_bounds, converged=top.converged,
            matvecs=top.matvecs,
        ))
    return BlockSpectra(blocks=tuple(results), k=k, tol=float(tol))


__all__ = ["BlockSpectra", "BlockSpectrum", "block_spectra"]
