"""searchmerge: search model-merging recipes fast."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["merge", "Recipe", "load_recipe", "get_method", "list_methods", "__version__"]


def __getattr__(name: str):  # lazy: `import searchmerge` stays cheap (no torch/ray until used)
    if name == "merge":
        from searchmerge.merge import merge

        return merge
    if name in ("Recipe", "load_recipe"):
        from searchmerge import recipe

        return getattr(recipe, name)
    if name in ("get_method", "list_methods"):
        from searchmerge.methods import registry

        return getattr(registry, name)
    raise AttributeError(name)
