"""The one YAML reader for user files (recipes, MergeKit configs, search and bench specs).

Plain YAML only: mappings, lists, strings, numbers, booleans and null. Refused, with ``file:line:col``:
syntax errors, any explicit tag (``!!python/object/apply:…`` never constructs anything, nor does
``!!binary`` or ``!custom``), duplicate keys (PyYAML would silently keep the last), aliases to an
undefined anchor, recursive or exploding aliases, several documents in one file, and a document that is
not a mapping. Dates stay strings. Every refusal is the caller's own error class (a ``SearchmergeError``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from searchmerge.errors import Position, SearchmergeError, YamlError, message

#: A document's positions: path of keys / indexes (as in pydantic's ``loc``) -> where its value starts;
#: ``(*path, KEY)`` -> where the key itself starts (for "unknown key" errors).
Positions = dict[tuple[Any, ...], Position]
KEY = "<key>"

_MERGE_TAG = "tag:yaml.org,2002:merge"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MAX_NODES = 1_000_000  # after expanding aliases: refuses "billion laughs" documents


class _Refused(Exception):
    def __init__(self, what: str, fix: str, mark: Any = None) -> None:
        super().__init__(what)
        self.what, self.fix, self.mark = what, fix, mark


class PlainLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses every explicit tag while composing, and keeps dates as strings."""

    yaml_implicit_resolvers = {
        key: [(tag, rx) for tag, rx in resolvers if tag != _TIMESTAMP_TAG]
        for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent: Node | None, index: Any) -> Node:  # type: ignore[override]
        event = self.peek_event()
        tag = getattr(event, "tag", None)
        if tag not in (None, "!"):
            raise _Refused(
                f"YAML tag `{_short(tag)}` is not allowed",
                "searchmerge reads plain YAML (mappings, lists, strings, numbers, booleans, null); remove the tag",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _short(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag


def _where(name: str, mark: Any) -> Position:
    if mark is None:
        return Position(name)
    return Position(name, mark.line + 1, mark.column + 1)


def _walk(node: Node, path: tuple[Any, ...], positions: Positions, name: str, seen: set[int]) -> None:
    """Record positions and refuse duplicate keys; each node once (aliases share nodes)."""
    positions.setdefault(path, _where(name, node.start_mark))
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, SequenceNode):
        for i, child in enumerate(node.value):
            _walk(child, (*path, i), positions, name, seen)
    elif isinstance(node, MappingNode):
        keys: dict[tuple[str, str], Any] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag != _MERGE_TAG:
                ident = (key_node.tag, key_node.value)
                if ident in keys:
                    first = keys[ident]
                    raise _Refused(
                        f"duplicate key `{key_node.value}` (first at line {first.line + 1})",
                        "YAML would keep only the last value; keep one of them",
                        key_node.start_mark,
                    )
                keys[ident] = key_node.start_mark
                positions.setdefault((*path, key_node.value, KEY), _where(name, key_node.start_mark))
                _walk(value_node, (*path, key_node.value), positions, name, seen)
            else:
                _walk(value_node, path, positions, name, seen)


def _size(node: Node, memo: dict[int, int], active: set[int]) -> int:
    """Node count with aliases expanded; refuses recursive aliases (cycles)."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in active:
        raise _Refused("recursive alias", "an anchor cannot contain an alias to itself; write the value out",
                       node.start_mark)
    active.add(id(node))
    total = 1
    if isinstance(node, SequenceNode):
        total += sum(_size(c, memo, active) for c in node.value)
    elif isinstance(node, MappingNode):
        total += sum(_size(k, memo, active) + _size(v, memo, active) for k, v in node.value)
    active.discard(id(node))
    memo[id(node)] = min(total, _MAX_NODES + 1)
    if total > _MAX_NODES:
        raise _Refused("document too large after expanding aliases",
                       "aliases multiply content; write the values out or shrink the file", node.start_mark)
    return memo[id(node)]


_FIXES = {
    "found undefined alias": "define the anchor (`&name`) before its alias (`*name`), or remove the alias",
    "expected a single document": "one file holds one document: remove the extra `---` and what follows",
    "found unhashable key": "a mapping key must be a plain string or number",
}


def _syntax_fix(problem: str) -> str:
    for start, fix in _FIXES.items():
        if start in problem:
            return fix
    if "tab" in problem or "'\\t'" in problem:
        return "indent with spaces, not tabs"
    return "fix the YAML syntax here (an unclosed bracket or quote, a missing `:` or a bad indent)"


def load_yaml(
    text: str | bytes, *, name: str = "<yaml>", error: type[SearchmergeError] = YamlError
) -> tuple[Any, Positions]:
    """Parse one plain-YAML document; returns ``(data, positions)`` or raises ``error`` with file:line:col."""
    try:
        loader = PlainLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, {}
            positions: Positions = {}
            _walk(node, (), positions, name, set())
            _size(node, {}, set())
            return loader.construct_document(node), positions
        finally:
            loader.dispose()
    except _Refused as exc:
        raise error(message(exc.what, exc.fix, _where(name, exc.mark))) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        fix = _syntax_fix(f"{exc.context or ''} {exc.problem or ''}".strip())
        raise error(message(f"invalid YAML: {problem}", fix, _where(name, mark))) from None
    except yaml.reader.ReaderError as exc:  # bad bytes / encoding: a position, no line
        raise error(message(f"invalid YAML: {exc.reason} at character {exc.position}", "save the file as UTF-8 text",
                            name)) from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise error(message(f"invalid YAML: {detail}", "save the file as UTF-8 text", name)) from None
    except RecursionError:
        raise error(message("YAML nested too deeply", "flatten the document", name)) from None


def read_yaml_mapping(
    path: str | Path, *, what: str, error: type[SearchmergeError] = YamlError, keys: Sequence[str] = ()
) -> tuple[dict[str, Any], Positions]:
    """Read a YAML file that must hold one mapping (``what`` names it in messages, e.g. "recipe")."""
    path = Path(path)
    if not path.is_file():
        kind = "is a folder" if path.is_dir() else "not found"
        raise error(message(f"{what} file {kind}", "pass the path of a YAML file", path))
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(message(f"cannot read the {what}: {exc.strerror}", "check the file's permissions", path)) from None
    data, positions = load_yaml(raw, name=str(path), error=error)
    if not isinstance(data, dict):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        need = f" with {', '.join(f'`{k}`' for k in keys)}" if keys else ""
        raise error(message(f"a {what} must be a YAML mapping{need}, got {got}", "write `key: value` lines",
                            positions.get((), Position(str(path)))))
    return data, positions


def position_of(positions: Positions, loc: Sequence[Any], default: Position | str | None = None) -> Position | str | None:
    """Where the longest known prefix of ``loc`` starts (pydantic locs and our own; a trailing ``KEY``: the key)."""
    loc = tuple(loc)
    if loc in positions:
        return positions[loc]
    loc = tuple(p for p in loc if p != KEY)
    for n in range(len(loc), -1, -1):
        prefix = loc[:n]
        if prefix in positions:
            return positions[prefix]
        alt = tuple(str(p) if isinstance(p, int) and not isinstance(p, bool) else p for p in prefix)
        if alt in positions:
            return positions[alt]
    return default
