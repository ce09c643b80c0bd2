"""Pure helpers for the resident store: split a GTA-family method into a cacheable sparsify stage and a
cheap, elementwise combine stage; compact (bit-packed) sparse representations; chunked combine.

Exactness: :func:`apply_stage` runs the very ``sparsify`` calls, in the very order, that
``generalized_task_arithmetic`` and the registered methods run; :func:`combine` calls
``generalized_task_arithmetic`` itself with sparsification off. The combine stage is elementwise
(stack, weight, sign election, disjoint sum, scale per position), so running it chunk by chunk gives the
same bits as running it on whole tensors (checked by the tests with a tiny chunk size).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from searchmerge.methods import task_arithmetic as ta
from searchmerge.methods.registry import MethodSpec
from searchmerge.methods.sparsify import sparsify
from searchmerge.store.sumorder import safe_chunks

Tensor = torch.Tensor


@dataclass(frozen=True)
class Stage:
    """The coefficient-independent part of a GTA method for one tensor: what every τ_i becomes before weighting.

    Depends only on the task vectors, the densities (and gamma/epsilon/rescale) and, for random
    sparsifiers, the seed — never on weights or λ — so its result is cached.
    """

    sparsification: str | None = None
    density: tuple[float, ...] = ()
    rescale: str = "none"
    gamma: tuple[float, ...] | None = None  # per model (breadcrumbs); None: the default 0.01
    epsilon: tuple[float, ...] | None = None  # per model (DELLA); None: the default 0.15
    seed: int | None = None  # only for random sparsifiers (rng = tensor_rng(seed, name))
    post_density: tuple[float, ...] | None = None  # dare_ties per-tensor TIES trim after the drop
    thresholds: tuple[float, ...] | None = None  # whole-model TIES trim (trim_scope: model)

    @property
    def trivial(self) -> bool:
        return self.sparsification is None and self.post_density is None and self.thresholds is None

    @property
    def random(self) -> bool:
        return self.sparsification in ("random", "della_magprune")

    def pre_threshold(self) -> "Stage":
        return replace(self, thresholds=None)


@dataclass(frozen=True)
class Combine:
    """The per-trial, coefficient-dependent part: weights, λ, sign election, disjoint merge."""

    weight: tuple[float, ...]
    lambda_: float
    consensus: str | None
    merge_func: str


def _merge_func(params: dict[str, Any]) -> str:
    return "mean" if params.get("normalize") else "sum"


def split_gta(spec: MethodSpec, params: dict[str, Any], stats: Any, seed: int) -> tuple[Stage, Combine] | None:
    """(sparsify stage, combine stage) for a registered GTA-family method, or ``None`` for any other method.

    Recognises the built-in functions by identity, so a method replaced or added elsewhere falls back to the
    generic per-tensor path (``merge_tensor``), which is always exact.
    """
    fn = spec.fn
    weight = tuple(float(w) for w in params.get("weight", ()))
    n = len(weight)
    lam = float(params.get("lambda", 1.0))
    ones = tuple([1.0] * n)
    if fn is ta.task_arithmetic:
        return Stage(), Combine(weight, lam, None, _merge_func(params))
    density = tuple(float(d) for d in params.get("density", ones))
    if fn is ta.ties:
        if params.get("elect_on", "weighted") != "weighted":  # AdaMerging++'s unweighted election: generic path
            return None
        thr = ta._thresholds(stats, params["trim_scope"], params["rescale"])
        if thr is None:
            stage = Stage("magnitude", density, params["rescale"])
        else:
            stage = Stage(thresholds=tuple(thr))
        return stage, Combine(weight, lam, "sum", params["merge_func"])
    if fn is ta.dare_ties:
        thr = ta._thresholds(stats, params["trim_scope"])
        trim = tuple(float(t) for t in params["trim_density"])
        post = trim if thr is None and any(t < 1 for t in trim) else None
        stage = Stage("random", density, params["rescale"], seed=seed, post_density=post,
                      thresholds=None if thr is None else tuple(thr))
        return stage, Combine(weight, lam, "sum", params["merge_func"])
    if fn is ta.dare_linear:
        return Stage("random", density, params["rescale"], seed=seed), Combine(weight, lam, None, _merge_func(params))
    if fn is ta.breadcrumbs or fn is ta.breadcrumbs_ties:
        stage = Stage("magnitude_outliers", density, params["rescale"], gamma=tuple(float(g) for g in params["gamma"]))
        if fn is ta.breadcrumbs:
            return stage, Combine(weight, lam, None, _merge_func(params))
        return stage, Combine(weight, lam, "sum", params["merge_func"])
    if fn is ta.della or fn is ta.della_linear:
        eps = tuple(float(e) for e in params["epsilon"])
        ta._check_della(list(density), list(eps))
        stage = Stage("della_magprune", density, params["rescale"], epsilon=eps, seed=seed)
        if fn is ta.della_linear:
            return stage, Combine(weight, lam, None, _merge_func(params))
        return stage, Combine(weight, lam, "sum", params["merge_func"])
    return None


def trim_stage(spec: MethodSpec, scalars: dict[str, Any], seed: int) -> tuple[Stage, list[float]] | None:
    """For the built-in whole-model trims (``prepare_model_trim``): the stage whose |values| are ranked, and the
    per-model densities; ``None`` for a method whose ``prepare`` the store does not know (generic fallback)."""
    if spec.prepare is ta._prepare_ties:
        stage = Stage()
    elif spec.prepare is ta._prepare_dare_ties:
        stage = Stage("random", tuple(float(d) for d in scalars["density"]), scalars["rescale"], seed=seed)
    else:
        return None
    key = "trim_density" if "trim_density" in scalars else "density"
    return stage, [float(d) for d in scalars[key]]


def apply_stage(stage: Stage, deltas: Sequence[Tensor], rng: torch.Generator | None) -> list[Tensor]:
    """The sparsified task vectors, exactly as the registered method computes them (new tensors or the inputs)."""
    return apply_stage_parts(stage, deltas, rng)[1]


def apply_stage_parts(
    stage: Stage, deltas: Sequence[Tensor], rng: torch.Generator | None
) -> tuple[list[Tensor], list[Tensor]]:
    """(output of the first sparsifier, final output of the stage)."""
    out = list(deltas)
    if stage.sparsification is not None:
        out = [
            sparsify(d, method=stage.sparsification, density=stage.density[i], rescale=stage.rescale, rng=rng,
                     gamma=0.01 if stage.gamma is None else stage.gamma[i],
                     epsilon=0.15 if stage.epsilon is None else stage.epsilon[i])
            for i, d in enumerate(out)
        ]
    first = list(out)
    out = finish_stage(stage, out)
    return first, out


def finish_stage(stage: Stage, out: list[Tensor]) -> list[Tensor]:
    """The steps after the first sparsifier: dare_ties' per-tensor trim, then the whole-model thresholds."""
    if stage.post_density is not None:
        out = [sparsify(d, method="magnitude", density=stage.post_density[i]) for i, d in enumerate(out)]
    if stage.thresholds is not None:
        out = [d * (d.abs() >= stage.thresholds[i]) for i, d in enumerate(out)]
    return out


def combine(c: Combine, sparse: Sequence[Tensor]) -> Tensor:
    """The merged delta from sparsified task vectors (``generalized_task_arithmetic`` with no sparsifier)."""
    n = len(sparse)
    return ta.generalized_task_arithmetic(
        sparse, weight=list(c.weight), density=[1.0] * n, lambda_=c.lambda_, sparsification=None,
        consensus=c.consensus, merge_func=c.merge_func,
    )


def weighted_sum_into(
    c: Combine, base: Tensor, taus: Sequence[Tensor], out: Tensor, *, chunk: int = 1 << 16
) -> Tensor:
    """``out = base + λ·Σ w_i τ_i`` (÷ Σw for ``mean``) chunk by chunk into ``out`` (the torch path, where the
    generated kernels do not run: no numba, another device, another dtype).

    Each chunk runs :func:`combine` (the core's own ops) on float32 views; :func:`~searchmerge.store.sumorder.
    safe_chunks` keeps the columns where torch's ``sum(dim=0)`` changes its order in place, so the bits are the
    whole tensor's (tested).
    """
    assert c.consensus is None
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_taus = [t.reshape(-1) for t in taus]
    for s, e in safe_chunks(flat_base.numel(), chunk):
        merged = combine(c, [t[s:e] if t.dtype == torch.float32 else t[s:e].to(torch.float32) for t in flat_taus])
        _add_base_into(flat_base, merged, flat_out, s, e)
    return out


def _add_base_into(flat_base: Tensor, delta: Tensor, flat_out: Tensor, s: int, e: int) -> None:
    """``flat_out[s:e] = base[s:e] + delta`` in float32 (cast to the output dtype only at the end)."""
    b = flat_base[s:e] if flat_base.dtype == torch.float32 else flat_base[s:e].to(torch.float32)
    if flat_out.dtype == torch.float32:
        torch.add(b, delta, out=flat_out[s:e])
    else:
        flat_out[s:e].copy_(b + delta)


def scale_add_into(base: Tensor, unscaled: Tensor, lambda_: float, out: Tensor, *, chunk: int = 1 << 18) -> Tensor:
    """``out = base + unscaled·λ`` chunk by chunk (the last two float32 steps of :func:`combine` + base)."""
    flat_out, flat_base, flat_u = out.view(-1), base.reshape(-1), unscaled.reshape(-1)
    n = flat_base.numel()
    step = min(chunk, max(n, 1))
    acc = torch.empty(step, dtype=torch.float32, device=base.device)
    for s in range(0, n, step):
        e = min(n, s + step)
        a = acc[: e - s]
        torch.mul(flat_u[s:e], lambda_, out=a)
        _add_base_into(flat_base, a, flat_out, s, e)
    return out


def output_buffer(dst: torch.Tensor | None, base: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Where a merged tensor is computed: ``dst`` itself when it can be written in place, else a new tensor."""
    if dst is not None and dst.dtype == out_dtype and dst.is_contiguous() and dst.device == base.device:
        return dst
    return torch.empty(base.shape, dtype=out_dtype, device=base.device)


def deliver(target: torch.Tensor, dst: torch.Tensor | None) -> torch.Tensor:
    """``dst`` filled with ``target`` (a no-op when it was computed in place), or ``target`` when there is no ``dst``."""
    if dst is None or target is dst:
        return target
    dst.copy_(target)
    return dst


# --- compact sparse representation ----------------------------------------------------------------


@dataclass
class Sparse:
    """One sparsified task vector: ``op(τ · mask)``; ``mask`` is bit-packed (1 bit per entry) or ``None`` (all kept).

    ``op`` is the sparsifier's rescale: ``("none",)``, ``("div", density)`` or ``("mul", 0-dim tensor)``.
    ``dense`` holds the exact values instead when the compact form would not reproduce them bit for bit.
    """

    numel: int
    bits: np.ndarray | None = None
    op: tuple = ("none",)
    dense: Tensor | None = None

    @property
    def nbytes(self) -> int:
        if self.dense is not None:
            return self.dense.numel() * self.dense.element_size()
        return 0 if self.bits is None else int(self.bits.nbytes)

    def chunk(self, tau: Tensor, start: int, stop: int) -> Tensor:
        """Entries ``[start, stop)`` of the flat sparsified vector; ``start`` is a multiple of 8."""
        if self.dense is not None:
            return self.dense.reshape(-1)[start:stop]
        x = tau.reshape(-1)[start:stop].to(torch.float32)
        if self.bits is not None:
            x = x * unpack_mask(self.bits, start, stop, tau.device)
        if self.op[0] == "div":
            x = x / self.op[1]
        elif self.op[0] == "mul":
            x = x * self.op[1]
        return x


def pack_mask(mask: Tensor) -> np.ndarray:
    return np.packbits(mask.reshape(-1).to(torch.bool).cpu().numpy())


def unpack_mask(bits: np.ndarray, start: int, stop: int, device: torch.device | str = "cpu") -> Tensor:
    assert start % 8 == 0
    raw = np.unpackbits(bits[start // 8 : (stop + 7) // 8], count=stop - start).view(np.bool_)
    m = torch.from_numpy(raw)
    return m if str(device) == "cpu" else m.to(device)


def _first_op(stage: Stage, i: int, tau: Tensor, mask1: Tensor | None) -> tuple:
    """The rescale the first sparsifier applied to model ``i`` (mirrors ``rescale_masked``)."""
    if stage.sparsification is None or stage.density[i] >= 1 or stage.rescale == "none":
        return ("none",)
    if stage.rescale == "inverse":
        return ("div", stage.density[i]) if stage.density[i] > 0 else ("none",)  # density 0: nothing to rescale
    masked = tau * mask1 if mask1 is not None else tau
    before = tau.abs().sum()
    after = masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return ("none",)
    return ("mul", before / after)


def compact(stage: Stage, taus32: Sequence[Tensor], first: Sequence[Tensor], final: Sequence[Tensor]) -> list[Sparse]:
    """Compact forms of ``final`` (the stage's output); each is checked to reproduce ``final`` exactly."""
    out = []
    for i, (tau, f1, fin) in enumerate(zip(taus32, first, final)):
        n = tau.numel()
        if fin is tau:
            out.append(Sparse(n))
            continue
        mask1 = (f1 != 0) | (tau == 0) if f1 is not tau else None
        op = _first_op(stage, i, tau, mask1)
        keep = fin != 0
        sp = Sparse(n, pack_mask(keep), op)
        if not torch.equal(sp.chunk(tau, 0, n), fin.reshape(-1)):
            sp = Sparse(n, dense=fin.detach().clone())
        out.append(sp)
    return out


# --- numpy transport (zero-copy through the object store; bf16 travels as int16) ----------------


def to_numpy(t: Tensor) -> tuple[str, np.ndarray]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return "bfloat16", t.view(torch.int16).numpy()
    return str(t.dtype).removeprefix("torch."), t.numpy()


def from_numpy(item: tuple[str, np.ndarray], copy: bool = False) -> Tensor:
    tag, arr = item
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only arrays from the object store: we never write into them
        t = torch.from_numpy(arr)
    if tag == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.clone() if copy else t
