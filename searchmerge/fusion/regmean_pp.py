"""RegMean++ (FusionBench ``regmean_plusplus``, PR #115): RegMean whose Gram matrices for layer l are taken
on inputs produced by the *merged* model's earlier layers, merging layer by layer.

Generic over architectures: a "layer" is the first dotted integer of a module name (``encoder.layer.3.…``);
linear modules outside the layers (BERT's pooler, a projection) form a last step. For step b and model i
the forward runs a composite backbone — the merge so far everywhere, model i's own weights inside step b —
on model i's own train examples, with hooks on step b's linear modules: exactly the reference's "inputs
from the merged layers < l, then model i's own layer l". Everything that is not a hooked linear weight is
the simple mean (the reference averages the embeddings and every non-linear parameter of a layer).

Differences from the reference, documented: tensors after the last layer (pooler, projection) are merged
(RegMean on merged inputs for linear ones, the mean otherwise), where FusionBench's CLIP version leaves them
at the pretrained values; each step re-runs the whole forward instead of caching per-layer activations
(same numbers, more compute). The statistics depend on the merge itself, so they are not cached on disk.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from searchmerge.bench.pool import Bench
from searchmerge.fusion.fisher import excluded
from searchmerge.fusion.forward import iter_batches, resolve_device, task_module
from searchmerge.fusion.regmean import regmean_solve
from searchmerge.fusion.stats import StatsRequest, example_index, gram_pass, linear_modules
from searchmerge.recipe import layer_index

Tensor = torch.Tensor


def steps(module_names: Sequence[str]) -> list[list[str]]:
    """Linear modules grouped by layer index, in depth order; modules outside the layers last."""
    by_layer: dict[int, list[str]] = {}
    rest: list[str] = []
    for n in module_names:
        i = layer_index(n)
        (by_layer.setdefault(i, []) if i is not None else rest).append(n)
    out = [by_layer[i] for i in sorted(by_layer)]
    return out + ([rest] if rest else [])


def regmean_plusplus(bench: Bench, request: StatsRequest, *, alpha: float, exclude: Sequence[str] = (),
                     advance: Callable[..., None] = lambda n=1, description=None: None) -> dict[str, Tensor]:
    """The merged backbone (a new state dict with the base's keys and dtypes)."""
    from searchmerge.bench.evaluate import task_features

    request.check()
    mp, tp = bench.modelpool, bench.taskpool
    names = [t for t in tp.names if t in mp.finetuned]
    models = [mp.finetuned[t] for t in names]
    merged: dict[str, Tensor] = {}
    for k, b in mp.base.items():
        if not b.is_floating_point() or excluded(k, exclude):
            merged[k] = b.clone()
        else:
            dtype = torch.promote_types(b.dtype, torch.float32)
            merged[k] = torch.stack([m[k].to(dtype) for m in models]).mean(0).to(b.dtype)
    probe = mp.model(mp.base)
    data = []
    for t in names:
        feats = task_features(probe, tp, t, request.split)
        data.append((feats, example_index(len(tp.tasks[t].splits[request.split]), request.examples, request.seed)))
    device = resolve_device(request.device)
    modules = [task_module(mp, m, t).to(device) for m, t in zip(models, names)]
    lin = linear_modules(modules[0].backbone)
    todo = [n for n in lin if f"{n}.weight" in merged and not excluded(f"{n}.weight", exclude)]
    for group in steps(todo):
        layer = layer_index(group[0])  # model i's whole layer l (its norms too), as the reference forwards it
        own = {k for k in merged if (layer_index(k) == layer if layer is not None
                                     else any(k.startswith(f"{n}.") for n in group))}
        grams: list[dict[str, Tensor]] = []
        for i, (module, (feats, idx)) in enumerate(zip(modules, data)):
            composite = {k: (models[i][k] if k in own else v) for k, v in merged.items()}
            module.backbone.load_state_dict(composite, strict=True)
            g, _ = gram_pass(module, iter_batches(feats, idx, request.batch_size, device), only=group)
            grams.append(g)
            advance(1, description=f"regmean++: {group[0].rsplit('.', 1)[0]} ({names[i]})")
        for n in group:
            merged[f"{n}.weight"] = regmean_solve([m[f"{n}.weight"] for m in models], [g[n] for g in grams], alpha,
                                                  transpose=lin[n][1]).to(mp.base[f"{n}.weight"].dtype)
    return merged


def step_count(bench: Bench) -> int:
    """How many (step, model) passes :func:`regmean_plusplus` runs (for a progress total)."""
    mp = bench.modelpool
    names = [t for t in bench.taskpool.names if t in mp.finetuned]
    lin = linear_modules(task_module(mp, mp.base, names[0]).backbone)
    return len(steps(list(lin))) * len(names)

