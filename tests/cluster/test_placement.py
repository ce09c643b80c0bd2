"""The store's default placement: one actor per node using every free core, unless asked otherwise."""

from __future__ import annotations

import pytest

from searchmerge.cluster.placement import default_placement


@pytest.mark.parametrize("free,actors,cpus,threads,want", [
    (2.0, 1, None, None, (2.0, 2)),   # the whole machine: every core a kernel thread, no shard travels
    (16.0, 1, None, None, (16.0, 16)),
    (2.0, 2, None, None, (1.0, 1)),   # asked for 2 actors: the free CPUs shared
    (3.0, 2, None, None, (1.0, 1)),
    (0.5, 1, None, None, (1.0, 1)),   # at least one CPU (build then refuses what Ray cannot grant)
    (2.0, 1, 0.1, None, (0.1, 1)),    # a sliver of CPU still runs one kernel thread
    (2.0, 1, 1.0, 4, (1.0, 4)),       # what was asked is kept
    (2.0, 1, 2.0, 0, (2.0, 2)),       # 0 threads means the default
])
def test_default_placement(free, actors, cpus, threads, want):
    assert default_placement(free, actors, cpus, threads) == want
