"""torchsum: Σ v(x_j) in torch's CPU float32 sum order, bit for bit against ``torch.sum`` (1 and 2 threads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchmerge.methods.sparsify import counter_draws, keep_threshold
from searchmerge.store import torchsum as ts

pytestmark = pytest.mark.skipif(ts.torch_width() is None, reason="torch's CPU sum order is not known here (no AVX2)")

W = ts.torch_width() or 8
G = 4 * W
# every boundary of the order: the scalar path (< W), vectors, groups of 4 vectors, a level step (16 groups),
# 16² groups (the second cascade level), GRAIN_SIZE and the 2-thread split
SIZES = sorted({0, 1, 2, 3, 4, 5, 7, W - 1, W, W + 1, 2 * W + 3, G - 1, G, G + 1, 3 * G + W + 5, 16 * G - 1,
                16 * G, 16 * G + 1, 17 * G + 2 * W + 3, 256 * G - 1, 256 * G, 256 * G + 7, 1000, 32767, 32768,
                32769, 65535, 65536, 65537, 98303, 98304, 98305, 300_001})


def _values(n: int, seed: int) -> np.ndarray:
    """Signed log-uniform values, over ~16 decades (1e-8..1e8) for even seeds, over e^±2 for odd ones (where
    every addition rounds, not only the largest few): their float32 sum depends on the order."""
    rng = np.random.default_rng(seed)
    spread = 18.4 if seed % 2 == 0 else 2.0
    return (np.exp(rng.uniform(-spread, spread, n)) * rng.choice([-1.0, 1.0], n)).astype(np.float32)


def _bits(v: float | np.floating | torch.Tensor) -> int:
    if isinstance(v, torch.Tensor):
        v = v.numpy()
    return int(np.float32(v).view(np.uint32))


def _sequential(v: np.ndarray) -> np.float32:
    s = np.float32(0)
    for a in v:
        s = np.float32(s + a)
    return s


class _Threads:
    """torch's intra-op thread count for a block, restored after."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.old)


@pytest.mark.parametrize("threads", [1, 2])
def test_plain_matches_torch_sum_bit_for_bit(threads: int) -> None:
    naive_differs = 0
    with _Threads(threads):
        for seed, n in enumerate(SIZES):
            v = _values(n, seed)
            want = torch.from_numpy(v).sum()
            got = ts.torch_order_sum("plain", v)
            assert isinstance(got, np.float32)
            assert _bits(got) == _bits(want), (n, got, want)
            naive_differs += n < 5000 and _bits(_sequential(v)) != _bits(want)
    assert naive_differs >= 5  # the values are order-sensitive: a wrong order would fail


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_abs_matches_torch_and_explicit_threads(threads: int) -> None:
    v = _values(200_003, 7)
    with _Threads(threads):
        want = torch.from_numpy(v).abs().sum()
    # the thread count is the order's, not the caller's: pass it explicitly under another torch setting
    assert _bits(ts.torch_order_sum("abs", v, threads=threads)) == _bits(want)
    assert _bits(ts.torch_order_sum("abs", v, threads=threads, workers=1)) == _bits(want)


def test_signed_zeros_sum_to_plus_zero() -> None:
    for n in (0, 3, W, 5 * G + 1):
        v = np.full(n, -0.0, dtype=np.float32)
        assert _bits(ts.torch_order_sum("plain", v)) == _bits(torch.from_numpy(v).sum()) == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_bfloat16_input_as_uint16(threads: int) -> None:
    with _Threads(threads):
        for seed, n in enumerate([5, G + 3, 40_000, 131_073]):
            t = torch.from_numpy(_values(n, 100 + seed)).to(torch.bfloat16)
            raw = t.view(torch.int16).numpy().view(np.uint16)
            want = t.to(torch.float32).sum()
            assert _bits(ts.torch_order_sum("plain", raw)) == _bits(want), n
            assert _bits(ts.torch_order_sum("abs", raw)) == _bits(t.to(torch.float32).abs().sum()), n


@pytest.mark.parametrize("threads", [1, 2])
def test_random_abs_matches_the_l1_rescale_sum(threads: int) -> None:
    """The DARE/DELLA L1 rescale's ``(delta·mask).abs().sum()`` with the counter-based random mask."""
    key = (0x1234ABCD, 0x0BADF00D)
    with _Threads(threads):
        for n, density in [(17, 0.5), (G * 20 + 3, 0.3), (70_001, 0.1), (250_000, 0.9)]:
            v = _values(n, n)
            mask = (counter_draws(key, 0, n) < keep_threshold(density)).to(torch.float32)
            want = (torch.from_numpy(v) * mask).abs().sum()
            got = ts.torch_order_sum("random_abs", v, np.uint32(key[0]), np.uint32(key[1]),
                                     np.uint32(keep_threshold(density)))
            assert _bits(got) == _bits(want), (n, density)


def test_registered_kind_with_a_per_entry_array() -> None:
    """A kind reading a second per-entry array (as a rank-based keep rule does) is cut into chunks with x."""
    ts.register_kind("test_keep_lt", ["v = abs(load(x, j) * np.float32(r[j] < c))"], ["r", "c"], arrays=["r"])
    rng = np.random.default_rng(3)
    with _Threads(2):
        for n in (9, 1000, 100_001):
            v = _values(n, n + 1)
            r = rng.integers(0, 1000, n).astype(np.uint16)
            want = (torch.from_numpy(v) * torch.from_numpy(r.astype(np.int32) < 400)).abs().sum()
            assert _bits(ts.torch_order_sum("test_keep_lt", v, r, np.uint16(400))) == _bits(want)
    n = 3 * 16**3 * G + 77  # superblocks on workers, the array cut with x
    v, r = _values(n, 5), rng.integers(0, 1000, n).astype(np.uint16)
    with _Threads(1):
        want = (torch.from_numpy(v) * torch.from_numpy(r.astype(np.int32) < 400)).abs().sum()
    assert _bits(ts.torch_order_sum("test_keep_lt", v, r, np.uint16(400), threads=1, workers=2)) == _bits(want)


def test_level_power_above_four() -> None:
    """A chunk of > 2**19 groups of 4W: the cascade's level step grows to 2**5 (embedding-sized tensors), on
    the calling thread and in superblocks on 3 workers."""
    n = (1 << 19) * G + 5 * G + 3
    v = np.tile(np.random.default_rng(11).uniform(0.5, 1.5, (1 << 20) + 1).astype(np.float32), 17)[:n]
    with _Threads(1):
        want = _bits(torch.from_numpy(v).abs().sum())
        assert _bits(ts.torch_order_sum("abs", v)) == want
        assert _bits(ts.torch_order_sum("abs", v, workers=3)) == want


@pytest.mark.parametrize("workers", [2, 3])
def test_one_chunk_in_superblocks_on_workers(workers: int) -> None:
    """One torch thread: the chunk's superblocks (16**3 groups of 4W) summed on the pool, added up in order."""
    sb = 16**3 * G
    key = (0x9E3779B9, 0x7F4A7C15)
    t = keep_threshold(0.4)
    with _Threads(1):
        for i, n in enumerate([2 * sb, 2 * sb + 1, 3 * sb + 16 * G + 5, 5 * sb + 4095 * G + 3 * W + 7]):
            v = _values(n, 2 * i + 1)
            assert _bits(ts.torch_order_sum("plain", v, workers=workers)) == _bits(torch.from_numpy(v).sum()), n
            mask = (counter_draws(key, 0, n) < t).to(torch.float32)
            want = (torch.from_numpy(v) * mask).abs().sum()
            got = ts.torch_order_sum("random_abs", v, np.uint32(key[0]), np.uint32(key[1]), np.uint32(t),
                                     workers=workers)
            assert _bits(got) == _bits(want), n


def test_order_known_self_check_passes() -> None:
    for threads in (1, 2):
        with _Threads(threads):
            assert ts.order_known()


def test_chunks_follow_parallel_reduce() -> None:
    assert ts.chunks(32768, 4) == [(0, 32768)]
    assert ts.chunks(32769, 4) == [(0, 16385), (16385, 32769)]
    assert ts.chunks(100_000, 2) == [(0, 50_000), (50_000, 100_000)]
    assert ts.chunks(10**6, 1) == [(0, 10**6)]


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="unknown value kind"):
        ts.torch_order_sum("nope", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="extra arguments"):
        ts.torch_order_sum("random_abs", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="1-D float32"):
        ts.torch_order_sum("plain", np.zeros(3, np.float64))
    with pytest.raises(ValueError, match="already registered"):
        ts.register_kind("abs", ["v = load(x, j)"])
    with pytest.raises(ValueError, match="must be among"):
        ts.register_kind("test_bad_arrays", ["v = load(x, j)"], ["a"], arrays=["b"])
    with pytest.raises(ValueError, match="clash"):
        ts.register_kind("test_bad_names", ["v = load(x, j)"], ["j0"])
