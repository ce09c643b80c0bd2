"""Data-driven and adaptive fusion: Fisher merging, RegMean, ensembles, AdaMerging (docs/fusion.md).

* :mod:`~searchmerge.fusion.fisher`, :mod:`~searchmerge.fusion.regmean` — the tensor maths (torch only).
* :mod:`~searchmerge.fusion.stats` — the statistics passes (Fisher diagonals, Gram matrices) and their cache.
* :mod:`~searchmerge.fusion.forward` — a differentiable ``batch -> logits`` module per pool, backbone and task.
* :mod:`~searchmerge.fusion.ensemble` — prediction ensembles (evaluated, not merged).
* :mod:`~searchmerge.fusion.adamerging` — task-/layer-wise coefficients by entropy minimisation.
* :mod:`~searchmerge.fusion.jobs` — each method as one job on a loaded bench (leaderboard rows).
"""
