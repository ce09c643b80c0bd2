"""The evaluation plan: which examples go in which batch, and in which order.

One plan serves every path (in-process, long-lived Ray actors, a search trial on the store): batches are
**length-bucketed** (a task's examples sorted by token count, so a batch pads to about its own length, never to
the split's maximum) and visited in a seeded order that **interleaves tasks**, so the result after any prefix of
batches is an unbiased estimate of the final one — what an early-stopping scheduler acts on."""

from __future__ import annotations

import numpy as np

Chunk = tuple[str, np.ndarray]  # (task, sorted example indices)


def plan_chunks(sizes: dict[str, int], batch_size: int, seed: int = 0,
                lengths: dict[str, np.ndarray] | None = None) -> list[Chunk]:
    """``(task, indices)`` chunks of at most ``batch_size`` examples, in a seeded order that interleaves tasks
    (the batches of all tasks ordered by their relative position), so every prefix covers each task in
    proportion.

    With ``lengths`` (tokens per example) each task's examples are length-bucketed: sorted by length (ties in
    a seeded order) and cut into batches (2.2-2.9x fewer padded tokens than random batches on the text zoo).
    The batches of a task are then visited in a seeded shuffled order, so each example is equally likely to
    fall in any prefix: a partial result stays an unbiased estimate of the final one (with some more variance
    than random batches, as each batch is one length stratum)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    keyed = []
    for t, n in sizes.items():
        perm = rng.permutation(n)
        if lengths is not None:
            perm = perm[np.argsort(np.asarray(lengths[t])[perm], kind="stable")]
        parts = [perm[s:s + batch_size] for s in range(0, n, batch_size)]
        if lengths is not None:
            parts = [parts[j] for j in rng.permutation(len(parts))]
        for j, idx in enumerate(parts):
            keyed.append(((j + rng.random()) / len(parts), t, np.sort(idx)))
    keyed.sort(key=lambda x: x[0])
    return [(t, idx) for _, t, idx in keyed]


def token_lengths(features: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """Tokens per example for text features (``attention_mask``, summed over every choice of a multiple-choice
    example); ``None`` for fixed-size inputs."""
    if not all("attention_mask" in f for f in features.values()):
        return None
    return {t: f["attention_mask"].reshape(len(f["attention_mask"]), -1).sum(1) for t, f in features.items()}


def chunk_features(features: dict[str, dict[str, np.ndarray]], task: str, idx: np.ndarray) -> dict[str, np.ndarray]:
    """One chunk's rows of a task's arrays (what a runner's ``predict`` consumes)."""
    return {k: v[idx] for k, v in features[task].items()}
