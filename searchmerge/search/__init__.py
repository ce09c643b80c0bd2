"""Recipe search: Ray Tune (Optuna / Nevergrad searchers, ASHA) over methods and their parameters on the
resident store. ``searchmerge.search.search(spec, out) -> SearchResult``."""

import sys
import types

from searchmerge.search.spec import SearchSpec, SearchSpecError, read_search_spec


def search(spec, out="runs/search", **kwargs):  # noqa: ANN001, ANN201
    from searchmerge.search.run import search as _search

    return _search(spec, out, **kwargs)


__all__ = ["search", "SearchSpec", "SearchSpecError", "read_search_spec"]


class _CallableModule(types.ModuleType):
    """``searchmerge.search(spec, out)`` runs a search while ``searchmerge.search.report`` etc. stay importable
    (a function bound over the subpackage's name would break ``import searchmerge.search.x as y``)."""

    def __call__(self, spec, out="runs/search", **kwargs):  # noqa: ANN001, ANN204
        return search(spec, out, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
