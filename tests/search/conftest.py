"""The fixture zoo for the search tests (built once per session into a temp cache)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fixture_zoo(tmp_path_factory):
    from searchmerge.bench.zoo import build_zoo

    return build_zoo("fixture", tmp_path_factory.mktemp("smcache"), progress=False)
