"""The driver's half of whole-model statistics (``trim_scope: model`` thresholds, or any other method's
``prepare``), mixed into :class:`~searchmerge.store.store.TaskVectorStore`: the actors report, the driver combines,
and the result is cached per what it depends on.

The store provides ``_actors``, ``_get``, ``n_params``, ``float_keys`` and the caches ``_thresholds``, ``_hist1``
and ``_stats_cache`` (emptied by ``clear_cache``).
"""

from __future__ import annotations

import json
from typing import Any

from searchmerge.merge import DTYPES, tensor_rng
from searchmerge.recipe import Recipe, global_scalars
from searchmerge.store.modeltrim import PendingTrim, pending_trim, radix_threshold
from searchmerge.store.stages import from_numpy, trim_stage


class WholeModelStats:
    """Whole-model statistics for a recipe (a mixin of :class:`~searchmerge.store.store.TaskVectorStore`)."""

    def _stats(self, recipe: Recipe, sel: list[int]) -> Any:
        """Whole-model statistics (two-phase: actors report, the driver combines), cached per what they depend on."""
        spec = recipe.spec
        scalars = global_scalars(recipe)
        if not spec.needs_prepare(scalars):
            return None
        known = trim_stage(spec, scalars, recipe.seed)
        if known is None:
            return self._generic_stats(recipe, sel, scalars)
        stage, densities = known
        key = (stage, tuple(sel), tuple(densities))
        if key in self._thresholds:  # thresholds, or (one actor) the bins its flagged passes resolve
            hit = self._thresholds[key]
            return hit if isinstance(hit, PendingTrim) else {"thresholds": list(hit)}
        total = self.n_params
        ks = [total - int(total * d) if d < 1 else 0 for d in densities]
        thresholds = [0.0] * len(sel)
        need = [i for i, k in enumerate(ks) if k > 0]
        if need:
            hkey = (stage, tuple(sel))
            h1 = self._hist1.get(hkey)
            if h1 is None:
                h1 = sum(self._get([a.trim_hist.remote(stage, sel) for a in self._actors]))
                self._hist1[hkey] = h1
            pending, need = pending_trim(h1, total, densities)
            if len(self._actors) == 1 and stage.trivial:  # the shard finds the low bits itself (flagged passes)
                self._thresholds[key] = pending
                return pending
            prefixes = [None if b is None else b[0] for b in pending.bins]
            h2 = sum(self._get([a.trim_hist.remote(stage, sel, prefixes) for a in self._actors]))
            for i in need:
                thresholds[i] = radix_threshold(*pending.bins[i], h2[i])
        self._thresholds[key] = thresholds
        return {"thresholds": list(thresholds)}

    def _generic_stats(self, recipe: Recipe, sel: list[int], scalars: dict[str, Any]) -> Any:
        """A method whose whole-model ``prepare`` the store does not know: run it as the merge core does."""
        key = (recipe.method, json.dumps(scalars, sort_keys=True, default=str), recipe.seed, recipe.dtype, tuple(sel))
        if key in self._stats_cache:
            return self._stats_cache[key]
        if len(self._actors) == 1:
            stats = self._get(self._actors[0].prepare_local.remote(recipe, sel))
        else:
            parts: dict[str, Any] = {}
            for p in self._get([a.export.remote(sel) for a in self._actors]):
                parts.update(p)
            compute = DTYPES[recipe.dtype]

            def items():
                for k in self.float_keys:
                    b, taus = parts[k]
                    yield k, from_numpy(b).to(compute), [from_numpy(t).to(compute) for t in taus], tensor_rng(recipe.seed, k)

            stats = recipe.spec.prepare(items(), scalars)  # type: ignore[misc]
        self._stats_cache[key] = stats
        return stats
