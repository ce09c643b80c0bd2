"""AdaMerging (Yang et al., ICLR 2024; FusionBench ``layer_wise_adamerging`` / ``task_wise_adamerging``).

Merged weights θ = θ₀ + Σ_i λ_{i,l} τ_{i,l}; ``granularity: layer`` learns one λ per model and per
*parameter tensor* (the reference's "layer"), ``task`` one λ per model. λ starts at ``init`` (0.3), is
optionally clamped to [0, 1] in the forward pass, and is trained with Adam on the Shannon entropy of each
task's softmax predictions, summed over tasks, one shuffled *unlabelled* batch per task per step. The
forward pass is ``torch.func.functional_call`` over the resident task vectors: no model copy per step.

Data: the ``validation`` split by default (this project's search split); ``train`` is allowed; ``test``
(the report split) only with ``allow_test: true``. FusionBench / the paper adapt on the unlabelled *test*
inputs (test-time adaptation); here that is opt-in. The learned λ are written as an ordinary
``task_arithmetic`` recipe (λ = 1, per-model ``weight`` conditionals on exact tensor names, longest name
first so a name that contains another never takes its value) which ``searchmerge merge`` reproduces exactly.

``ties: true`` is AdaMerging++ (the AdaMerging repository's ``main_*_adamergingpp.py``): λ multiplies the TIES
vectors τ̃_i instead of τ_i — each τ_i trimmed to its top ``ties_density`` (0.2) by magnitude over the whole model
(FusionBench / the TIES code's ``topk_values_mask``), then masked to the sign elected on the *unweighted* sum
Σ_j τ̂_j (``dis-sum``: each model keeps its own agreeing entries, λ applied after). Its recipe is the merge
core's ``ties`` with ``trim_scope: model``, ``merge_func: sum``, ``elect_on: unweighted`` and the λ as weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from searchmerge.bench.pool import Bench, BenchSpecError
from searchmerge.fusion.forward import PREFIX, TaskLogits, resolve_device, task_module

Tensor = torch.Tensor
GRANULARITIES = ("task", "layer")


@dataclass(frozen=True)
class AdaMergingConfig:
    granularity: str = "layer"
    steps: int = 1000  # FusionBench (the paper's repository: 500)
    lr: float = 1e-3  # FusionBench / the paper: Adam, lr 1e-3, betas (0.9, 0.999)
    init: float = 0.3
    batch_size: int = 16
    clamp: bool = False
    seed: int = 0
    split: str = "validation"
    allow_test: bool = False
    device: str = "cpu"  # auto | cpu | cuda: where the task vectors and the forward passes live
    ties: bool = False  # AdaMerging++: learn λ on TIES-trimmed, sign-elected task vectors
    ties_density: float = 0.2  # the reference's K = 20 (%), whole-model top-k per task vector

    def check(self) -> None:
        resolve_device(self.device)
        if not 0.0 < self.ties_density <= 1.0:
            raise BenchSpecError(f"adamerging ties_density must lie in (0, 1] (the reference keeps 0.2), "
                                 f"got {self.ties_density!r}.")
        if self.granularity not in GRANULARITIES:
            raise BenchSpecError(f"adamerging granularity must be one of {list(GRANULARITIES)}, got {self.granularity!r}.")
        if self.steps < 1 or self.batch_size < 1:
            raise BenchSpecError(f"adamerging steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}.")
        if not self.lr > 0:
            raise BenchSpecError(f"adamerging lr must be > 0, got {self.lr}.")
        if self.split not in ("train", "validation", "test"):
            raise BenchSpecError(f"adamerging split must be train or validation, got {self.split!r}.")
        if self.split == "test" and not self.allow_test:
            raise BenchSpecError(
                "adamerging split `test` is the report split: learning on it (even unlabelled, as the paper's "
                "test-time adaptation does) makes the reported numbers optimistic — use `validation`, or set "
                "`allow_test: true` to do it anyway."
            )


@dataclass
class AdaMergingResult:
    coefficients: Tensor  # [N, G] as applied (clamped when ``clamp``)
    groups: list[list[str]]  # backbone keys per coefficient column (one column for task-wise)
    recipe: Any  # searchmerge.recipe.Recipe (model names = task names, base "base")
    merged: dict[str, Tensor]  # merge(recipe) on the pool's state dicts
    history: list[float] = field(default_factory=list)  # summed entropy per step (before the step)


def parameter_groups(module: TaskLogits) -> list[list[str]]:
    """Backbone keys per trainable tensor (tied names share one group), in state-dict order."""
    groups: dict[int, list[str]] = {}
    for k, v in module.backbone.state_dict(keep_vars=True).items():
        if isinstance(v, nn.Parameter) and v.is_floating_point():
            groups.setdefault(id(v), []).append(k)
    return list(groups.values())


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of the softmax predictions (FusionBench's ``entropy_loss``, via log_softmax)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def merged_params(base: Mapping[str, Tensor], deltas: Mapping[str, Tensor], lam: Tensor,
                  groups: list[list[str]], task_wise: bool) -> dict[str, Tensor]:
    """``{"backbone." + first key of each group: θ₀ + Σ_i λ_i τ_i}`` (differentiable in ``lam``).

    ``deltas[k]`` is the stacked ``[N, *shape]`` task vectors of tensor k: one contraction per tensor
    (its backward is one mat-vec), instead of N scaled copies."""
    out = {}
    for g, keys in enumerate(groups):
        k = keys[0]
        col = lam[:, 0] if task_wise else lam[:, g]
        out[PREFIX + k] = base[k] + torch.tensordot(col, deltas[k], dims=1)
    return out


def ties_vectors(base: Mapping[str, Tensor], finetuned: list[Mapping[str, Tensor]], keys: list[str],
                 density: float) -> dict[str, Tensor]:
    """AdaMerging++'s vectors ``{k: [N, *shape] τ̃}`` for ``keys``, with the merge core's own TIES pieces.

    The whole-model cut-offs are taken over every float tensor of ``base`` (as the core's ``trim_scope: model``),
    then per tensor τ̂_i = τ_i·[|τ_i| ≥ cut_i] and τ̃_i = τ̂_i·[sign τ̂_i = elected sign of Σ_j τ̂_j]."""
    from searchmerge.methods.task_arithmetic import elect_sign, prepare_model_trim

    float_keys = [k for k, v in base.items() if v.is_floating_point()]
    delta = lambda k: [m[k].float() - base[k].float() for m in finetuned]  # noqa: E731 - as the core: f32 θ_i − θ₀
    cuts = prepare_model_trim(((k, base[k], delta(k), None) for k in float_keys),
                              {"density": [density] * len(finetuned)})["thresholds"]
    out = {}
    for k in keys:
        trimmed = torch.stack([d * (d.abs() >= cuts[i]) for i, d in enumerate(delta(k))])
        out[k] = trimmed * elect_sign(trimmed, "sum")[1]
    return out


def _batch_stream(n: int, batch_size: int, rng: np.random.Generator):  # noqa: ANN202
    """Endless shuffled batches of row indices (a new permutation each epoch)."""
    while True:
        perm = rng.permutation(n)
        for s in range(0, n, batch_size):
            yield perm[s:s + batch_size]


def coefficients_recipe(names: list[str], coefficients: Tensor, groups: list[list[str]], float_keys: list[str],
                        task_wise: bool, ties_density: float | None = None) -> Any:
    """The learned λ as a ``task_arithmetic`` recipe (``ties_density``: AdaMerging++'s ``ties`` recipe on the
    same TIES vectors); float tensors that are not parameters keep the base (0)."""
    from searchmerge.recipe import Recipe

    learned = {k for keys in groups for k in keys}
    fixed = sorted((k for k in float_keys if k not in learned), key=lambda k: (-len(k), k))
    models = []
    for i, name in enumerate(names):
        zero = [{"filter": k, "value": 0.0} for k in fixed]
        if task_wise:
            weight: Any = zero + [{"filter": None, "value": float(coefficients[i, 0])}] if zero else float(coefficients[i, 0])
        else:
            conds = [(k, float(coefficients[i, g])) for g, keys in enumerate(groups) for k in keys]
            conds += [(k, 0.0) for k in fixed]
            weight = [{"filter": k, "value": v} for k, v in sorted(conds, key=lambda c: (-len(c[0]), c[0]))]
        models.append({"model": name, "parameters": {"weight": weight}})
    if ties_density is not None:
        ties = {"lambda": 1.0, "density": float(ties_density), "trim_scope": "model", "merge_func": "sum",
                "elect_on": "unweighted"}
        return Recipe(method="ties", base_model="base", models=models, parameters=ties)
    return Recipe(method="task_arithmetic", base_model="base", models=models, parameters={"lambda": 1.0})


def adamerge(bench: Bench, config: AdaMergingConfig, *, progress: bool = False) -> AdaMergingResult:
    """Learn λ by entropy minimisation on unlabelled batches of ``config.split``; merge with the recipe."""
    from searchmerge.bench.evaluate import task_features
    from searchmerge.bench.zoo.common import progress_bar
    from searchmerge.merge import merge

    config.check()
    mp, tp = bench.modelpool, bench.taskpool
    names = [t for t in tp.names if t in mp.finetuned]
    tasks = [t for t in tp.names if t in mp.heads or not mp.family.needs_heads]
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    modules = {t: task_module(mp, mp.base, t).to(device) for t in tasks}
    for m in modules.values():
        m.requires_grad_(False)
    groups = parameter_groups(next(iter(modules.values())))
    keys = [k for keys in groups for k in keys]
    base = {k: mp.base[k].float().to(device) for k in keys}
    if config.ties:
        deltas = {k: v.to(device) for k, v in ties_vectors(mp.base, [mp.finetuned[t] for t in names], keys,
                                                            config.ties_density).items()}
    else:
        deltas = {k: torch.stack([mp.finetuned[t][k].float().to(device) for t in names]) - base[k] for k in keys}
    width = 1 if config.granularity == "task" else len(groups)
    lam = nn.Parameter(torch.full((len(names), width), float(config.init), device=device))
    opt = torch.optim.Adam([lam], lr=config.lr, betas=(0.9, 0.999))
    probe = mp.model(mp.base)
    feats = {t: task_features(probe, tp, t, config.split) for t in tasks}
    rng = np.random.default_rng(config.seed)
    streams = {t: _batch_stream(len(tp.tasks[t].splits[config.split]), config.batch_size, rng) for t in tasks}
    history: list[float] = []
    label = f"adamerging{'++' if config.ties else ''} ({config.granularity}-wise)"
    with progress_bar(progress, label, config.steps) as advance:
        for _ in range(config.steps):
            opt.zero_grad()
            coef = lam.clamp(0.0, 1.0) if config.clamp else lam
            params = merged_params(base, deltas, coef, groups, config.granularity == "task")
            loss = torch.zeros((), device=device)
            for t in tasks:
                rows = next(streams[t])
                batch = {k: torch.as_tensor(np.ascontiguousarray(v[rows])).to(device) for k, v in feats[t].items()}
                loss = loss + entropy(functional_call(modules[t], params, (batch,)))
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            advance(1)
    final = (lam.detach().clamp(0.0, 1.0) if config.clamp else lam.detach()).cpu().clone()
    float_keys = [k for k, v in mp.base.items() if v.is_floating_point()]
    recipe = coefficients_recipe(names, final, groups, float_keys, config.granularity == "task",
                                 config.ties_density if config.ties else None)
    merged = merge(recipe, base=mp.base, models=[mp.finetuned[t] for t in names])
    return AdaMergingResult(coefficients=final, groups=groups, recipe=recipe, merged=merged, history=history)  # type: ignore[arg-type]


def recipe_with_paths(bench: Bench, recipe: Any) -> Any:
    """The same recipe naming the pool's folders (base and fine-tuned), for ``searchmerge merge``."""
    from searchmerge.recipe import recipe_from_dict

    mp = bench.modelpool
    data = recipe.to_dict()
    data["base_model"] = str(mp.spec.path(mp.spec.base))
    for m in data["models"]:
        m["model"] = str(mp.spec.path(mp.spec.finetuned[m["model"]]))
    return recipe_from_dict(data)


def search_point(result: AdaMergingResult, names: list[str], layer_groups: int = 1) -> dict[str, Any]:
    """AdaMerging's λ as a starting point of a recipe search (``points_to_evaluate``) over
    ``task_arithmetic`` with ``granularity: per_model``, ``weight`` searched and ``lambda: 1.0`` (AdaMerging++:
    over ``ties`` with its recipe's fixed parameters: density, ``trim_scope: model``, ``merge_func: sum``, ...).

    Task-wise: each model's λ. Layer-wise with ``layer_groups`` G: per model, the mean λ of the tensors
    nearest each of the G depth knots (tensors outside the layers count at depth 0); G = 1: the mean λ.
    """
    from searchmerge.recipe import layer_fraction, layer_index

    coef = result.coefficients
    fixed = {"method": result.recipe.method, **result.recipe.parameters}
    if coef.shape[1] == 1:
        values: dict[str, Any] = {n: float(coef[i, 0]) for i, n in enumerate(names)}
        return {**fixed, "weight": values}
    keys = [keys[0] for keys in result.groups]
    layers = [i for i in (layer_index(k) for k in keys) if i is not None]
    n_layers = max(layers) + 1 if layers else 1
    knot = [int(math.floor(layer_fraction(k, n_layers) * (layer_groups - 1) + 0.5)) for k in keys]  # nearest, ties up
    values = {}
    for i, n in enumerate(names):
        per_g = [[float(coef[i, j]) for j in range(len(keys)) if knot[j] == g] for g in range(layer_groups)]
        means = [sum(v) / len(v) if v else float(coef[i].mean()) for v in per_g]
        values[n] = means[0] if layer_groups == 1 else means
    return {**fixed, "weight": values}
