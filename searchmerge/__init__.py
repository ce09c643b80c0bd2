"""searchmerge: search model-merging recipes fast."""

from __future__ import annotations

__version__ = "0.1.0"

# Bound eagerly: the package attribute `searchmerge.merge` must be the function, not the submodule of
# the same name (which the import system would otherwise set as the attribute once it is imported).
from searchmerge.merge import merge  # noqa: E402
from searchmerge.methods.registry import get_method, list_methods  # noqa: E402
from searchmerge.recipe import Recipe, load_recipe  # noqa: E402
import searchmerge.search as search  # noqa: E402  (the subpackage, callable: `searchmerge.search(spec, out)`)

__all__ = ["merge", "search", "Recipe", "load_recipe", "get_method", "list_methods", "__version__"]
