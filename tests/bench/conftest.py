"""Shared fixtures for the bench tests: the fixture zoo, built once per session into a temp cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fixture_zoo(tmp_path_factory):
    from searchmerge.bench.zoo import build_zoo

    cache = tmp_path_factory.mktemp("smcache")
    return build_zoo("fixture", cache, progress=False)


@pytest.fixture(scope="session")
def fixture_bench(fixture_zoo):
    from searchmerge.bench import load_bench

    return load_bench(fixture_zoo)
