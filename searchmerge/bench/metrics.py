"""Task metrics: ``metric(preds, labels) -> float``, registered by name (pluggable)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from searchmerge.errors import SearchmergeError

Metric = Callable[[np.ndarray, np.ndarray], float]
METRICS: dict[str, Metric] = {}


def register_metric(name: str) -> Callable[[Metric], Metric]:
    def deco(fn: Metric) -> Metric:
        METRICS[name] = fn
        return fn

    return deco


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise SearchmergeError(f"unknown metric `{name}`; registered metrics: {sorted(METRICS)}.")
    return METRICS[name]


@register_metric("accuracy")
def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(preds) == np.asarray(labels)).mean()) if len(labels) else 0.0


@register_metric("macro_f1")
def macro_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    f1s = []
    for c in np.unique(labels):
        tp = float(((preds == c) & (labels == c)).sum())
        fp = float(((preds == c) & (labels != c)).sum())
        fn = float(((preds != c) & (labels == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0
