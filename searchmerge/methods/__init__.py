"""Built-in merge methods; importing this package registers them all."""

from searchmerge.methods import spherical, task_arithmetic  # noqa: F401
from searchmerge.methods import selection, subspace  # noqa: F401
from searchmerge.methods.registry import METHODS, MethodSpec, Param, get_method, list_methods, merge_method

__all__ = ["METHODS", "MethodSpec", "Param", "get_method", "list_methods", "merge_method"]
