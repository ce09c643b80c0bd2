"""Recipe search: Ray Tune (Optuna / Nevergrad searchers, ASHA) over methods and their parameters on the
resident store. ``searchmerge.search.search(spec, out) -> SearchResult``."""

from searchmerge.search.spec import SearchSpec, SearchSpecError, read_search_spec


def search(spec, out="runs/search", **kwargs):  # noqa: ANN001, ANN201
    from searchmerge.search.run import search as _search

    return _search(spec, out, **kwargs)


__all__ = ["search", "SearchSpec", "SearchSpecError", "read_search_spec"]
