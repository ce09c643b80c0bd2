"""Data statistics for Fisher merging and RegMean: the passes over training examples, and their disk cache.

* :func:`fisher_pass` — FusionBench's diagonal Fisher from the model's *own* predictive distribution:
  per batch, L = Σ_batch Σ_class √p·log p (p detached), F += (∂L/∂θ)², then F /= examples. The square
  comes after the batch sum; ``variant="per_example"`` runs batches of one, i.e. F = mean_x g_x².
* :func:`gram_pass` — forward hooks on every ``nn.Linear`` (and GPT-2 ``Conv1D``) of the backbone:
  G = Σ xᵀx / tokens over every token of every batch (FusionBench's running mean, accumulated in float64).
* :func:`pool_statistics` — one statistics set per fine-tuned model, on *its own task's* train split
  (``count`` examples drawn by a seeded permutation), cached on disk under
  ``$SEARCHMERGE_CACHE/fusion/<kind>/<key>.safetensors``; the key hashes exactly what the numbers depend
  on: every backbone and head tensor and the config, the data file's bytes and the selected model inputs,
  count, seed, batch size, variant, split. Written atomically; kept on CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn

from searchmerge.bench.pool import Bench, BenchSpecError
from searchmerge.fusion.forward import TaskLogits, iter_batches, resolve_device, task_module

Tensor = torch.Tensor
KINDS = ("fisher", "gram")
FISHER_VARIANTS = ("batch", "per_example")
STATS_VERSION = 1  # bump when a pass changes what it computes
CACHE_STATS = {"hits": 0, "computed": 0}
DEFAULT_EXAMPLES = 256  # FusionBench num_fisher_examples / num_regmean_examples
DEFAULT_BATCH = 32


# --- the passes ---------------------------------------------------------------------------------------


def fisher_pass(module: TaskLogits, batches: Iterable[Mapping[str, Tensor]],
                advance: Callable[[int], None] = lambda n: None) -> dict[str, Tensor]:
    """Diagonal Fisher of every backbone parameter (state-dict keys; tied names share one value), CPU float32."""
    named = {k: v for k, v in module.backbone.state_dict(keep_vars=True).items()
             if isinstance(v, nn.Parameter) and v.is_floating_point()}
    params = list({id(p): p for p in named.values()}.values())
    for p in params:
        p.requires_grad_(True)
    acc = {id(p): torch.zeros_like(p, dtype=torch.float32, device="cpu") for p in params}
    seen = 0
    for batch in batches:
        for p in params:
            p.grad = None
        logits = module(batch).float()
        prob = torch.softmax(logits, dim=-1).detach()
        (prob.sqrt() * torch.log_softmax(logits, dim=-1)).sum().backward()
        for p in params:
            if p.grad is not None:
                acc[id(p)] += p.grad.detach().float().cpu() ** 2
        n = int(logits.shape[0])
        seen += n
        advance(n)
    for p in params:
        p.grad = None
    if seen == 0:
        raise ValueError("fisher_pass got no examples")
    return {k: (acc[id(p)] / seen).contiguous() for k, p in named.items()}


def linear_modules(backbone: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    """``{module name: (module, weight is [out, in])}`` for ``nn.Linear`` and transformers' ``Conv1D`` ([in, out])."""
    out = {}
    for name, m in backbone.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (m, True)
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
            out[name] = (m, False)
    return out


@torch.no_grad()
def gram_pass(module: TaskLogits, batches: Iterable[Mapping[str, Tensor]],
              advance: Callable[[int], None] = lambda n: None,
              only: Iterable[str] | None = None) -> tuple[dict[str, Tensor], dict[str, bool]]:
    """``({module: G = Σ_tokens xᵀx / tokens}, {module: transposed})`` for every linear layer of the backbone
    (or just those named in ``only``)."""
    mods = linear_modules(module.backbone)
    if only is not None:
        keep = set(only)
        mods = {n: v for n, v in mods.items() if n in keep}
    sums: dict[str, Tensor] = {}
    tokens: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, inputs: tuple[Tensor, ...], _out: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            xtx = (x.T @ x).cpu()
            sums[name] = sums[name] + xtx if name in sums else xtx
            tokens[name] = tokens.get(name, 0) + int(x.shape[0])
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, (m, _) in mods.items()]
    try:
        for batch in batches:
            module(batch)
            advance(int(next(iter(batch.values())).shape[0]))
    finally:
        for h in handles:
            h.remove()
    grams = {n: (sums[n] / tokens[n]).float().contiguous() for n in sums}
    return grams, {n: mods[n][1] for n in grams}


# --- keys and the cache ----------------------------------------------------------------------------------


def hash_tensors(tensors: Mapping[str, Tensor], h: Any = None) -> str:
    """blake2b over sorted names, dtypes, shapes and bytes."""
    h = h or hashlib.blake2b(digest_size=16)
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def hash_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def stats_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_dir(root: str | Path | None = None) -> Path:
    from searchmerge.bench.zoo.common import cache_root

    return cache_root(root) / "fusion"


def load_or_compute(kind: str, parts: Mapping[str, Any], compute: Callable[[], tuple[dict[str, Tensor], dict[str, Any]]],
                    root: str | Path | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` from ``<cache>/fusion/<kind>/<key>.safetensors``, else computed and written atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = cache_dir(root) / kind / f"{stats_key({'kind': kind, **parts})}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            CACHE_STATS["hits"] += 1
            return tensors, meta
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            pass
    tensors, meta = compute()
    CACHE_STATS["computed"] += 1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta), "parts": json.dumps(dict(parts), default=str)})
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the numbers are still returned
    return tensors, meta


# --- the pool-level entry point ------------------------------------------------------------------------


@dataclass
class StatsRequest:
    """What a statistics set depends on besides the model: the data it is computed from, and how."""

    kind: str
    examples: int = DEFAULT_EXAMPLES
    seed: int = 0
    batch_size: int = DEFAULT_BATCH
    variant: str = "batch"  # fisher only: batch | per_example
    split: str = "train"
    device: str = "cpu"  # where the passes run (auto | cpu | cuda); statistics are always kept on CPU
    cache: str | None = None  # cache root (default: $SEARCHMERGE_CACHE or ~/.cache/searchmerge)

    def check(self) -> None:
        if self.kind not in KINDS:
            raise BenchSpecError(f"statistics kind must be one of {list(KINDS)}, got {self.kind!r}.")
        if self.kind == "fisher" and self.variant not in FISHER_VARIANTS:
            raise BenchSpecError(f"fisher variant must be one of {list(FISHER_VARIANTS)}, got {self.variant!r}.")
        if not isinstance(self.examples, int) or self.examples < 1:
            raise BenchSpecError(f"examples must be a positive integer, got {self.examples!r}.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise BenchSpecError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        from searchmerge.fusion.forward import resolve_device

        resolve_device(self.device)
        if self.split not in ("train", "validation"):
            raise BenchSpecError(
                f"statistics split must be `train` (or `validation`), got {self.split!r}: data-driven merging "
                f"never reads the report (test) split."
            )


def example_index(n: int, count: int, seed: int) -> np.ndarray:
    """The first ``count`` rows of a seeded permutation of ``n`` (all rows when ``count >= n``)."""
    return np.random.default_rng(seed).permutation(n)[: min(count, n)]


def _data_path(bench: Bench, task: str, split: str) -> Path:
    spec = bench.taskpool.tasks[task].spec
    rel = spec.validation if split == "validation" and spec.validation is not None else spec.train
    return bench.taskpool.spec.path(rel)


def _model_hash(bench: Bench, state: Mapping[str, Tensor], task: str) -> str:
    mp = bench.modelpool
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"family": mp.spec.family, "config": mp.task_configs.get(task, mp.config)},
                        sort_keys=True, default=str).encode())
    hash_tensors(state, h)
    return hash_tensors(mp.heads.get(task, {}), h)


def pool_statistics(bench: Bench, request: StatsRequest, *, progress: bool = True,
                    tasks: list[str] | None = None) -> list[tuple[dict[str, Tensor], dict[str, Any]]]:
    """One ``(tensors, meta)`` per fine-tuned model (in task order), each on its own task's ``split``.

    Fisher: tensors = {backbone key: F}. Gram: tensors = {module name: G}, meta["transposed"] = {module: bool}.
    """
    from searchmerge.bench.evaluate import task_features
    from searchmerge.bench.zoo.common import progress_bar

    request.check()
    mp, tp = bench.modelpool, bench.taskpool
    tasks = tasks or [t for t in tp.names if t in mp.finetuned]
    batch = 1 if request.kind == "fisher" and request.variant == "per_example" else request.batch_size
    jobs = []
    model_probe = mp.model(mp.base)  # only keys the preprocessed-features cache (family, base folder)
    for t in tasks:
        feats = task_features(model_probe, tp, t, request.split)
        idx = example_index(len(tp.tasks[t].splits[request.split]), request.examples, request.seed)
        parts = {
            "version": STATS_VERSION, "model": _model_hash(bench, mp.finetuned[t], t),
            "data_file": hash_file(_data_path(bench, t, request.split)), "split": request.split,
            "inputs": hash_arrays({k: v[idx] for k, v in feats.items()}), "examples": int(len(idx)),
            "seed": request.seed, "batch_size": batch,
            "variant": request.variant if request.kind == "fisher" else "",
        }
        jobs.append((t, feats, idx, parts))
    out = []
    total = sum(len(j[2]) for j in jobs)
    with progress_bar(progress, f"{request.kind} statistics", total) as advance:
        for t, feats, idx, parts in jobs:
            def compute(t: str = t, feats: Any = feats, idx: np.ndarray = idx) -> tuple[dict[str, Tensor], dict[str, Any]]:
                advance(0, description=f"{request.kind} statistics: {t}")
                device = resolve_device(request.device)
                module = task_module(mp, mp.finetuned[t], t).to(device)
                batches = iter_batches(feats, idx, batch, device)
                if request.kind == "fisher":
                    return fisher_pass(module, batches, advance), {"examples": int(len(idx))}
                grams, transposed = gram_pass(module, batches, advance)
                return grams, {"examples": int(len(idx)), "transposed": transposed}

            before = CACHE_STATS["computed"]
            out.append(load_or_compute(request.kind, parts, compute, request.cache))
            if CACHE_STATS["computed"] == before:
                advance(len(idx), description=f"{request.kind} statistics: {t} (cached)")
    return out
