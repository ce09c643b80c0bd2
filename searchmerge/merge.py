"""The merge driver: validate a recipe against its checkpoints, then merge tensor by tensor.

Everything that can be wrong (paths, keys, shapes, dtypes, parameter values) is checked in
:func:`plan_merge` before any tensor is merged. :func:`merge_tensor` is the single per-tensor entry
point that the file merge and the resident store (``searchmerge.store``) both call, so the two give
the same tensors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from searchmerge.errors import CheckpointError, NonFiniteError, RecipeError
from searchmerge.io.checkpoint import open_checkpoint
from searchmerge.io.task_models import HEAD_MODES, TaskModel, backbone_config, backbone_views, heads_message, write_task_folders
from searchmerge.methods.registry import MethodSpec
from searchmerge.recipe import Recipe, global_scalars, layer_fraction, layer_index, load_recipe, resolve_params

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def tensor_rng(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (recipe seed, tensor name): the same masks in any order, shard or device."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def merge_tensor(
    spec: MethodSpec,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    params: dict[str, Any],
    *,
    rng: torch.Generator | None = None,
    stats: Any = None,
    compute_dtype: torch.dtype = torch.float32,
    inputs_are_deltas: bool = False,
) -> torch.Tensor:
    """Merge one tensor; returns a new tensor in ``compute_dtype``. Inputs are never modified.

    ``tensors`` are full weights θ_i, or task vectors τ_i when ``inputs_are_deltas`` (the resident store).
    """
    b = base.to(compute_dtype) if base is not None else None
    xs = [t.to(compute_dtype) for t in tensors]
    if spec.inputs == "deltas":
        assert b is not None
        deltas = xs if inputs_are_deltas else [x - b for x in xs]
        return b + spec(b, deltas, params, rng=rng, stats=stats)
    weights = [b + x for x in xs] if inputs_are_deltas and b is not None else xs
    return spec(b, weights, params, rng=rng, stats=stats)


@dataclass
class MergePlan:
    """A validated recipe bound to opened checkpoints."""

    recipe: Recipe
    spec: MethodSpec
    base: Any
    models: list[Any]
    keys: list[str]
    merged_keys: list[str]
    n_layers: int
    task_models: list[TaskModel | None] | None = None  # per model: its head when it is a task-model folder
    base_task_model: TaskModel | None = None

    def heads_message(self, mode: str = "drop") -> str | None:
        return heads_message(self.task_models or [], [m.model for m in self.recipe.models], mode)

    @property
    def reference(self) -> Any:
        return self.base if self.base is not None else self.models[0]

    def params_for(self, name: str) -> dict[str, Any]:
        return resolve_params(self.recipe, name, layer_fraction(name, self.n_layers))


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def check_compatible(ref: Any, ref_name: str, readers: Sequence[Any], names: Sequence[str]) -> None:
    """Every reader has exactly ``ref``'s tensors, shapes, and float-ness; the error names tensor and model."""
    keys = ref.keys()
    ref_keys = set(keys)
    for where, r in zip(names, readers):
        missing = sorted(ref_keys - set(r.keys()))
        extra = sorted(set(r.keys()) - ref_keys)
        if missing:
            raise CheckpointError(f"{where} is missing tensor(s) {missing[:5]} that the {ref_name} has.")
        if extra:
            raise CheckpointError(f"{where} has tensor(s) {extra[:5]} that the {ref_name} lacks.")
        for k in keys:
            if r.shape(k) != ref.shape(k):
                raise CheckpointError(
                    f"shape mismatch for tensor {k}: {ref_name} has {list(ref.shape(k))}, "
                    f"{where} has {list(r.shape(k))}."
                )
            if _is_float(r.dtype(k)) != _is_float(ref.dtype(k)):
                raise CheckpointError(
                    f"dtype mismatch for tensor {k}: {ref_name} has {ref.dtype(k)}, {where} has {r.dtype(k)}; "
                    "a float tensor cannot be merged with an integer one."
                )


def plan_merge(
    recipe: Recipe,
    *,
    base: Any = None,
    models: Sequence[Any] | None = None,
    allow_pickle: bool = False,
) -> MergePlan:
    """Open and cross-check every checkpoint; raise a clear error before any merging work.

    ``base``/``models`` may be given as in-memory state dicts (Python API); otherwise the recipe's paths
    are opened lazily.
    """
    spec = recipe.spec
    base_reader = None
    if recipe.base_model is not None or base is not None:
        base_reader = open_checkpoint(base if base is not None else recipe.base_model, allow_pickle=allow_pickle)
    sources = list(models) if models is not None else recipe.model_paths
    if len(sources) != len(recipe.models):
        raise RecipeError(f"recipe lists {len(recipe.models)} models but {len(sources)} sources were given.")
    readers = [open_checkpoint(s, allow_pickle=allow_pickle) for s in sources]
    (base_reader, *readers), (base_info, *infos) = backbone_views([base_reader, *readers])
    ref = base_reader if base_reader is not None else readers[0]
    ref_name = "base model" if base_reader is not None else f"models[0] ({recipe.models[0].model})"
    keys = ref.keys()
    check_compatible(ref, ref_name, readers, [f"models[{i}] ({m.model})" for i, m in enumerate(recipe.models)])
    merged = [k for k in keys if _is_float(ref.dtype(k))]
    layers = [i for i in (layer_index(k) for k in keys) if i is not None]
    return MergePlan(
        recipe=recipe,
        spec=spec,
        base=base_reader,
        models=readers,
        keys=keys,
        merged_keys=merged,
        n_layers=(max(layers) + 1) if layers else 1,
        task_models=infos,
        base_task_model=base_info,
    )


def _whole_model_stats(plan: MergePlan, device: str, compute_dtype: torch.dtype) -> Any:
    spec = plan.spec
    scalars = global_scalars(plan.recipe)
    if not spec.needs_prepare(scalars):
        return None

    def items() -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor], torch.Generator]]:
        for k in plan.merged_keys:
            b = plan.base.get(k, device).to(compute_dtype)
            deltas = [m.get(k, device).to(compute_dtype) - b for m in plan.models]
            yield k, b, deltas, tensor_rng(plan.recipe.seed, k)

    return spec.prepare(items(), scalars)  # type: ignore[misc]


def iter_merged(
    plan: MergePlan,
    *,
    device: str = "cpu",
    out_dtype: str | None = None,
    progress: bool = False,
    allow_non_finite: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor)`` in checkpoint order; non-float tensors pass through from the base.

    Each float tensor is checked for NaN/±Inf as it is read, and each merged tensor as it is made (unless
    ``allow_non_finite``): a ``NonFiniteError`` names the model and the tensor, before anything is written.
    """
    recipe = plan.recipe
    compute = DTYPES[recipe.dtype]
    out_name = out_dtype or recipe.out_dtype
    stats = _whole_model_stats(plan, device, compute)
    base_name, model_names = _sources(plan)
    bar = _progress(progress, len(plan.keys), f"merging ({recipe.method})")
    try:
        for k in plan.keys:
            ref_t = plan.reference.get(k, device)
            if not _is_float(ref_t.dtype):
                yield k, ref_t
            else:
                base_t = ref_t if plan.base is not None else None
                tensors = [m.get(k, device) for m in plan.models]
                if not allow_non_finite:
                    if base_t is not None:
                        check_finite(base_t, k, base_name)
                    for t, name in zip(tensors, model_names):
                        check_finite(t, k, name)
                out = merge_tensor(
                    plan.spec, base_t, tensors, plan.params_for(k),
                    rng=tensor_rng(recipe.seed, k) if plan.spec.uses_rng else None,
                    stats=stats, compute_dtype=compute,
                ).to(DTYPES[out_name] if out_name else ref_t.dtype)
                if not allow_non_finite:
                    check_finite_output(out, k)
                yield k, out
            if bar is not None:
                bar[0].advance(bar[1])
    finally:
        if bar is not None:
            bar[0].stop()


_ALLOW_HINT = "or pass --allow-non-finite (Python: allow_non_finite=True) to merge it anyway"


def check_finite(t: torch.Tensor, tensor: str, source: str) -> None:
    """Refuse a float tensor holding NaN or ±Inf (one fused reduction over a tensor already in memory)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = ~torch.isfinite(t)
        n_nan = int(torch.isnan(t).sum())
        raise NonFiniteError(
            f"tensor {tensor} of {source} holds non-finite values ({n_nan} NaN, {int(bad.sum()) - n_nan} ±Inf) — "
            f"repair or re-export that checkpoint, {_ALLOW_HINT}"
        )


def check_finite_output(t: torch.Tensor, tensor: str) -> None:
    """Refuse a merged tensor that came out NaN/±Inf from finite inputs (e.g. an overflow in float16)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(
            f"merged tensor {tensor} is not finite in {str(t.dtype).removeprefix('torch.')} although every input "
            "is — merge or write in a wider dtype (recipe `dtype` / --dtype float32), lower the weights or λ, "
            f"{_ALLOW_HINT}"
        )


def _sources(plan: "MergePlan") -> tuple[str, list[str]]:
    recipe = plan.recipe
    return f"the base model ({recipe.base_model})", [f"models[{i}] ({m.model})" for i, m in enumerate(recipe.models)]


def _progress(enabled: bool, total: int, label: str):  # noqa: ANN202
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    prog = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    task = prog.add_task(label, total=total)
    prog.start()
    return prog, task


def output_bytes(plan: MergePlan, out_dtype: str | None = None) -> int:
    """Bytes the merged weights take on disk (from the checkpoints' headers: nothing is read)."""
    name = out_dtype or plan.recipe.out_dtype
    total = 0
    for k in plan.keys:
        dtype = plan.reference.dtype(k)
        size = DTYPES[name].itemsize if name and dtype.is_floating_point else dtype.itemsize
        total += int(torch.Size(plan.reference.shape(k)).numel()) * size
    return total


def merge(
    recipe: Recipe | str | Path,
    *,
    out: str | Path | None = None,
    device: str = "cpu",
    out_dtype: str | None = None,
    base: dict[str, torch.Tensor] | None = None,
    models: Sequence[dict[str, torch.Tensor]] | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    allow_non_finite: bool = False,
    heads: str = "drop",
) -> dict[str, torch.Tensor] | Path:
    """Merge per ``recipe`` (a :class:`Recipe` or a YAML path, ours or MergeKit's).

    Returns the merged state dict, or, with ``out``, writes an HF folder atomically and returns its path.
    The output location (exists, writable, free space) is checked before any tensor is merged; NaN/±Inf in
    an input or the output is refused unless ``allow_non_finite``. Task-model folders
    (``…ForSequenceClassification``) merge their backbones; ``heads="per_task"`` also writes ``tasks/<model>/``,
    each model's head on the merged backbone (see :mod:`searchmerge.io.task_models`).
    """
    from searchmerge.io.outdir import check_output_dir

    if heads not in HEAD_MODES:
        raise RecipeError(f"heads must be one of {list(HEAD_MODES)}, got {heads!r}.")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if out_dtype is not None and out_dtype not in DTYPES:
        raise RecipeError(f"out_dtype must be one of {sorted(DTYPES)}, got {out_dtype!r}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"device {device!r} requested but CUDA is not available here.")
    if out is not None:
        check_output_dir(out, force=overwrite)
    if recipe.data is not None:
        if base is not None or models is not None:
            raise RecipeError("a data recipe reads its models from its bench (`data.bench`); pass no base/models.")
        return _merge_with_data(recipe, out=out, device=device, out_dtype=out_dtype, overwrite=overwrite,
                                progress=progress, allow_non_finite=allow_non_finite, heads=heads,
                                allow_pickle=allow_pickle)
    plan = plan_merge(recipe, base=base, models=models, allow_pickle=allow_pickle)
    if out is not None:
        check_output_dir(out, force=overwrite, needed_bytes=output_bytes(plan, out_dtype))
    merged = {k: v.cpu() if out is not None else v for k, v in iter_merged(
        plan, device=device, out_dtype=out_dtype, progress=progress, allow_non_finite=allow_non_finite)}
    if out is None:
        return merged
    return write_merged(plan, merged, out, recipe_text=recipe.to_yaml(), overwrite=overwrite, heads=heads)


def write_merged(plan: MergePlan, merged: dict[str, torch.Tensor], out: str | Path, *, recipe_text: str,
                 overwrite: bool = False, heads: str = "drop", extra: dict[str, str] | None = None,
                 names: list[str] | None = None) -> Path:
    """Write a merged state dict as the HF folder ``out``, atomically: the reference's model files, the merged
    base model's config, the recipe, ``extra`` files, and with ``heads="per_task"`` each model's head
    (``tasks/<name>/``; default names: the plan's model entries)."""
    from searchmerge.io.writer import write_safetensors_folder

    folder = plan.reference.folder
    files = {"searchmerge_recipe.yaml": recipe_text, **(extra or {})}
    ref_info = plan.base_task_model if plan.base is not None else (plan.task_models or [None])[0]
    if ref_info is not None:  # the output is the merged base model, so its config must say so
        files["config.json"] = json.dumps(backbone_config(ref_info.config), indent=2)

    def add_tasks(tmp: Path) -> None:
        if heads == "per_task" and plan.task_models:
            write_task_folders(tmp, merged, plan.models, plan.task_models,
                               names if names is not None else [m.model for m in plan.recipe.models])

    return write_safetensors_folder(
        merged, out, config_from=folder, extra_files=files, overwrite=overwrite, before_publish=add_tasks,
    )


def _merge_with_data(recipe: Recipe, *, out: str | Path | None, device: str, out_dtype: str | None,
                     overwrite: bool, progress: bool, allow_non_finite: bool, heads: str, allow_pickle: bool = False
                     ) -> dict[str, torch.Tensor] | Path:
    """A data-driven merge (``recipe.data``, :mod:`searchmerge.fusion.data_recipe`): the bench and the models'
    folders are checked, then the statistics / adaptation run, then the output is written like any merge."""
    from searchmerge.fusion.data_recipe import bench_paths, data_bench, run_data_recipe
    from searchmerge.io.outdir import check_output_dir

    bench = data_bench(recipe)
    base_path, model_paths = bench_paths(bench)
    plan = plan_merge(Recipe(method="task_arithmetic", base_model=base_path,
                             models=[{"model": p} for p in model_paths]),  # the checkpoints the output is made of
                      allow_pickle=allow_pickle)
    if out is not None:
        check_output_dir(out, force=overwrite, needed_bytes=output_bytes(plan, out_dtype))
    state, extra = run_data_recipe(recipe, bench, device=device, progress=progress)
    unknown = sorted(set(state) - set(plan.keys))
    if unknown:
        raise CheckpointError(f"the bench's models hold tensor(s) {unknown[:5]} that the base folder lacks.")
    merged, name = {}, out_dtype or recipe.out_dtype
    for k in plan.keys:
        ref = plan.reference.get(k, "cpu")
        t = state.get(k, ref)
        if ref.is_floating_point():
            t = t.to(DTYPES[name] if name else ref.dtype)
            if not allow_non_finite:
                check_finite_output(t, k)
        merged[k] = t.cpu()
    if out is None:
        return merged
    return write_merged(plan, merged, out, recipe_text=recipe.to_yaml(), overwrite=overwrite, heads=heads,
                        extra=extra, names=[m.model for m in recipe.models])
