"""The compute bound of an evaluation: forward FLOPs of the real data over a matmul rate measured here.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the model's own forward (matmuls,
attention included; embedding lookups are not matmuls, so they are excluded), once per distinct real
token count, with no padding; the matmul rate is ``torch.mm`` on the model's own linear shapes at the
evaluator's thread count. ``bound_s = flops / rate`` is what a perfect evaluator would take."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> int:
    """QK^T and AV of the CPU attention kernel, which torch's counter does not register (its CUDA kernels it does)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def _count(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_sdpa_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        fn()
    return int(fc.get_total_flops())


def split_flops(predict: Callable[[str, dict[str, np.ndarray]], Any], features: dict[str, dict[str, np.ndarray]],
                tasks: Sequence[str]) -> dict[str, int]:
    """Forward FLOPs per task of one pass over ``features`` at each example's real length (no padding).

    ``predict(task, batch)`` is the evaluator's own forward; it is run on one example per distinct length
    (an example of that length from the data) and the count multiplied by how many examples have it."""
    out = {}
    for t in tasks:
        f = features[t]
        n = len(next(iter(f.values())))
        mask = f.get("attention_mask")
        flat = mask is not None and mask.ndim == 2  # one sequence per example: cut it to its real length
        if mask is None:
            keys = [0] * n
        else:
            keys = mask.sum(1).tolist() if flat else [tuple(r) for r in mask.reshape(n, mask.shape[1], -1).sum(-1).tolist()]
        first: dict[Any, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        total = 0
        for key, count in Counter(keys).items():
            i = first[key]
            row = {k: v[i:i + 1, :key] if flat and k in ("input_ids", "attention_mask") else v[i:i + 1]
                   for k, v in f.items()}
            total += count * _count(lambda: predict(t, row))
        out[t] = total
    return out


def linear_shapes(module: torch.nn.Module) -> Counter[tuple[int, int]]:
    """``(in, out)`` of every ``nn.Linear`` in the model, with multiplicity."""
    return Counter((m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear))


def matmul_rate(shapes: Counter[tuple[int, int]], rows: int, num_threads: int, repeats: int = 5,
                device: str = "cpu") -> float:
    """FLOP/s of ``torch.mm`` over the model's linear shapes (``rows`` tokens per batch), each shape weighted by
    its multiplicity; best of ``repeats`` (the rate the hardware can give, not an average over noise)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        flops = secs = 0.0
        for (fan_in, fan_out), mult in shapes.items():
            x = torch.randn(rows, fan_in, device=device)
            w = torch.randn(fan_in, fan_out, device=device)
            torch.mm(x, w)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                if device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                torch.mm(x, w)
                if device != "cpu":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            flops += mult * 2.0 * rows * fan_in * fan_out
            secs += mult * best
        return flops / secs
    finally:
        torch.set_num_threads(prev)
