"""Test set-up: Ray binds to loopback with usage stats and token auth off; one ray.init per session."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind to 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray (2 CPUs, 2 GiB object store) shared by every test that needs it."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=2 * 1024**3,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _release_ray_evaluators():
    """A test's kept Ray evaluator (its actors hold CPUs) is closed after it, so the next test's actors fit."""
    yield
    import sys

    mod = sys.modules.get("searchmerge.bench.evaluators")
    if mod is not None:
        mod.close_evaluators()
