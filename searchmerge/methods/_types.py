"""Shared parameter types, so that every method declares e.g. `weight` with the same range."""

from __future__ import annotations

from typing import Annotated, Literal

from searchmerge.methods.registry import PerModel, Range

#: Per-model mixing weight (MergeKit `weight`); any real is valid, search 0..1.
Weight = PerModel[Annotated[float, Range(search=(0.0, 1.0))]]
#: Fraction of entries kept by a sparsifier (MergeKit `density`, 1 − DARE's drop rate p).
Density = PerModel[Annotated[float, Range(0.0, 1.0, low_open=True, search=(0.05, 1.0))]]
#: Global scale of the merged task vector (FusionBench `scaling_factor`, MergeKit `lambda`).
Scale = Annotated[float, Range(search=(0.0, 1.5))]
#: Interpolation factor between two endpoints.
Unit = Annotated[float, Range(0.0, 1.0)]
#: How a sparsified task vector is rescaled: MergeKit's L1-norm matching, the DARE paper's 1/density, or none.
Rescale = Literal["l1", "inverse", "none"]
#: TIES trimming scope: per tensor (MergeKit) or one top-k over the whole model's task vector (FusionBench/paper).
TrimScope = Literal["tensor", "model"]
#: TIES disjoint merge: sum (FusionBench default), mean over agreeing models (MergeKit `normalize: true`), max.
MergeFunc = Literal["sum", "mean", "max"]
#: TIES sign election on the weighted trimmed deltas (MergeKit) or on the trimmed deltas before the weights.
ElectOn = Literal["weighted", "unweighted"]
