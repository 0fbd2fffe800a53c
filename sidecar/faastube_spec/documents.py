"""Untrusted YAML and JSON documents, read within fixed bounds.

A Workflow document comes from whoever can write a file, create a custom
resource or set a pod's environment, and ``faastube run``, the operator and
every pod read it. PyYAML's loaders build a whole node graph before anyone can
look at it, and that is where the cheap attacks live: a few hundred bytes of
nested aliases (``b: &b [*a, *a, ...]``) stand for 10^9 values that the next
walk (a validator, ``repr`` in an error message, ``json.dumps``) expands; 50,000
nested ``[`` overflow the composer's recursion; a long run of digits is an
integer that ``int()`` refuses with a bare ``ValueError``.

So ``load_yaml`` reads the parser's event stream (libyaml's when PyYAML has it)
and builds plain Python values itself, on an explicit stack, counting as it
goes, and stops at the first limit crossed with an error that names the limit
and the line. ``check_value`` applies the same limits to a value that arrived
already parsed (a Kubernetes object, a JSON environment variable), so every
input meets the same bounds whatever its way in. ``preview`` is the one way to
quote an untrusted value in a message: short, whatever its size or depth.

Only what a configuration document needs is built: mappings, sequences, the
scalars of YAML 1.1 as ``yaml.safe_load`` reads them (but timestamps stay
strings, as in JSON), anchors and aliases. Merge keys (``<<``), recursive
aliases, non-scalar keys and other tags (``!!set``, ``!!omap``, ``!!binary``,
``!!python/...``) are refused.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from faastube.errors import InvalidRequest
from yaml import events as ev
from yaml.resolver import Resolver

__all__ = [
    "DEFAULT_LIMITS",
    "INT_MAX",
    "INT_MIN",
    "DocumentInvalid",
    "DocumentLimits",
    "check_value",
    "load_json",
    "load_yaml",
    "preview",
]

# Integers are read as JSON and Kubernetes read them: signed 64-bit.
INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
# No int64 needs more characters than this (``-0b`` and 64 binary digits, with room for ``_``).
_INT_MAX_CHARS = 100


@dataclass(frozen=True)
class DocumentLimits:
    """Bounds on one document. The defaults hold a 10,000-function workflow with room to spare."""

    max_bytes: int = 4 * 2**20
    # Mappings and sequences inside each other; a workflow needs 6, a Kubernetes object ~15.
    max_depth: int = 64
    # Every mapping, sequence, key and scalar, each alias counted as a copy of what it names.
    # A 10,000-function chain with every field set has ~240,000. Loading is ~1.5 us a value
    # for libyaml's event and up to ~2 us more for the slowest scalars (floats with '_'),
    # so this many stay within about a second whatever they are.
    max_nodes: int = 250_000
    # Kubernetes caps all of an object's annotations together at 256 KiB.
    max_scalar_chars: int = 256 * 2**10


DEFAULT_LIMITS = DocumentLimits()


class DocumentInvalid(InvalidRequest):
    """Not a document we read: bad syntax, or a limit crossed (``limit`` names the field of
    ``DocumentLimits``, or ``"int64"``). ``path`` and ``line`` say where, when known."""

    def __init__(self, message: str, *, path: str = "", line: int | None = None,
                 column: int | None = None, limit: str | None = None) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.column = column
        self.limit = limit
        where = ""
        if line is not None:
            where = f"line {line}, column {column}: " if column is not None else f"line {line}: "
        super().__init__(f"{where}{message}")


# --------------------------------------------------------------------------- quoting values

_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def preview(value: Any) -> str:
    """A short ``repr`` of an untrusted value: long strings, deep or large collections,
    recursive ones and huge integers are all cut to a few dozen characters."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT_MIN <= value <= INT_MAX:
        # repr() of an int beyond 4300 digits raises; beyond int64 the digits say nothing anyway.
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, str) and len(value) > _REPR.maxstring:
        return f"{value[:_REPR.maxstring - 20]!r}... ({len(value):,} characters)"
    try:
        return _REPR.repr(value)
    except Exception:  # a hostile object's __repr__ may raise anything; say what it was instead
        return f"<{type(value).__name__}>"


# --------------------------------------------------------------------------- values already parsed


def check_value(value: Any, *, limits: DocumentLimits = DEFAULT_LIMITS, path: str = "") -> None:
    """Raise ``DocumentInvalid`` if ``value`` (dicts, lists, scalars) is beyond ``limits``.

    Shared and even recursive references are walked as the copies a serializer
    would write, so an alias bomb or a cycle stops at ``max_nodes``. Iterative:
    no depth can overflow the stack.
    """
    max_nodes, max_depth = limits.max_nodes, limits.max_depth
    nodes = 1
    root = (value, 1, None, None)
    if not _is_collection(value):
        _check_scalar(value, root, path, limits)
        return
    # Collections to visit: (value, depth, key or index, parent entry); a path is rebuilt
    # from these only for an error.
    stack: list[tuple[Any, int, Any, Any]] = [root]
    while stack:
        entry = stack.pop()
        item, depth = entry[0], entry[1]
        if depth > max_depth:
            raise DocumentInvalid(f"nested deeper than {max_depth} levels (the limit of max_depth)",
                                  path=_path_of(entry, path), limit="max_depth")
        is_mapping = isinstance(item, Mapping)
        for key, child in (item.items() if is_mapping else enumerate(item)):
            nodes += 2 if is_mapping else 1  # a mapping's key is a value too
            if nodes > max_nodes:
                raise DocumentInvalid(f"more than {max_nodes:,} values (the limit of max_nodes; "
                                      "shared or recursive references count once per use)",
                                      path=_path_of(entry, path), limit="max_nodes")
            if is_mapping and type(key) is not str:
                _check_scalar(key, (key, depth + 1, key, entry), path, limits)
            kind = type(child)
            if kind is str:  # the common case, inline
                if len(child) > limits.max_scalar_chars:
                    _check_scalar(child, (child, depth + 1, key, entry), path, limits)
            elif kind is dict or kind is list or _is_collection(child):
                stack.append((child, depth + 1, key, entry))
            else:
                _check_scalar(child, (child, depth + 1, key, entry), path, limits)


def _is_collection(value: Any) -> bool:
    return isinstance(value, (Mapping, list, tuple))


def _check_scalar(item: Any, entry: Any, path: str, limits: DocumentLimits) -> None:
    if isinstance(item, (str, bytes)):
        if len(item) > limits.max_scalar_chars:
            raise DocumentInvalid(f"a string of {len(item):,} characters, longer than "
                                  f"{limits.max_scalar_chars:,} (the limit of max_scalar_chars)",
                                  path=_path_of(entry, path), limit="max_scalar_chars")
    elif isinstance(item, int) and not isinstance(item, bool) and not INT_MIN <= item <= INT_MAX:
        raise DocumentInvalid(f"{preview(item)} does not fit in a signed 64-bit integer",
                              path=_path_of(entry, path), limit="int64")


def _path_of(entry: Any, prefix: str) -> str:
    parts: list[str] = []
    while entry is not None and entry[3] is not None:
        key = entry[2]
        parts.append(f"[{key}]" if isinstance(key, int) and isinstance(entry[3][0], (list, tuple))
                     else f".{key}" if isinstance(key, str) else f"[{preview(key)}]")
        entry = entry[3]
    text = prefix + "".join(reversed(parts))
    return text[1:] if text.startswith(".") else text


# --------------------------------------------------------------------------- JSON


def load_json(text: str, *, limits: DocumentLimits = DEFAULT_LIMITS) -> Any:
    """A JSON document within ``limits``. Raises ``json.JSONDecodeError`` if it is not JSON
    (so a caller can try YAML next) and ``DocumentInvalid`` if it is, but too big."""
    _check_size(text, limits)
    # json.loads allocates every container before we can count them: count them first
    # (brackets inside strings count too, which only errs towards refusing).
    if text.count("{") + text.count("[") > limits.max_nodes:
        raise DocumentInvalid(f"more than {limits.max_nodes:,} mappings and lists "
                              "(the limit of max_nodes)", limit="max_nodes")
    try:
        value = json.loads(text, parse_int=_json_int, object_pairs_hook=_json_object)
    except RecursionError:
        raise DocumentInvalid(f"nested deeper than {limits.max_depth} levels (the limit of max_depth)",
                              limit="max_depth") from None
    check_value(value, limits=limits)
    return value


def _json_int(digits: str) -> int:
    if len(digits) > _INT_MAX_CHARS:
        raise DocumentInvalid(f"an integer of {len(digits):,} digits does not fit in a signed "
                              "64-bit integer", limit="int64")
    return int(digits)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):  # json.loads would keep the last silently, as PyYAML would
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DocumentInvalid(f"duplicate key {preview(key)}")
            seen.add(key)
    return value


def _check_size(text: str, limits: DocumentLimits) -> None:
    # Characters never outnumber UTF-8 bytes: count bytes only when it could matter.
    if len(text) > limits.max_bytes or (4 * len(text) > limits.max_bytes
                                        and len(text.encode("utf-8", "surrogatepass")) > limits.max_bytes):
        raise DocumentInvalid(f"the document is larger than {limits.max_bytes:,} bytes "
                              "(the limit of max_bytes)", limit="max_bytes")


# --------------------------------------------------------------------------- YAML

_STR = Resolver.DEFAULT_SCALAR_TAG
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_MERGE = "tag:yaml.org,2002:merge"
# Plain scalars are typed by PyYAML's own patterns (YAML 1.1, as yaml.safe_load), by first
# character. Timestamps stay strings, as in JSON and in what the API server returns; the
# '=' (value) and 'yaml' types of YAML 1.1 are strings too (safe_load refuses them).
# Every float has a '.' and nothing else typed does, so the patterns are split on that
# (each is ~0.4 us, and a hostile document can hold 250,000 scalars).
_IMPLICIT_DOTTED: dict[str, list[tuple[str, Any]]] = {}
_IMPLICIT_UNDOTTED: dict[str, list[tuple[str, Any]]] = {}
for _first, _resolvers in Resolver.yaml_implicit_resolvers.items():
    for _tag, _pattern in _resolvers:
        if _tag in (_NULL, _BOOL, _INT, _FLOAT, _MERGE):
            _table = _IMPLICIT_DOTTED if _tag == _FLOAT else _IMPLICIT_UNDOTTED
            _table.setdefault(_first, []).append((_tag, _pattern))
_IMPLICIT = {*_IMPLICIT_DOTTED, *_IMPLICIT_UNDOTTED}  # first characters that may start a typed scalar
_BOOLS = {"yes": True, "true": True, "on": True, "no": False, "false": False, "off": False}
_SEQUENCE_TAGS = frozenset((None, "!", Resolver.DEFAULT_SEQUENCE_TAG))
_MAPPING_TAGS = frozenset((None, "!", Resolver.DEFAULT_MAPPING_TAG))
_NO_KEY = object()


def load_yaml(text: str, *, limits: DocumentLimits = DEFAULT_LIMITS) -> Any:
    """The one YAML (or JSON) document in ``text``, as plain Python values within ``limits``.

    Empty documents (``---`` alone) are skipped; zero or several others are an error.
    """
    _check_size(text, limits)
    try:
        documents = _Builder(_events(text), limits).documents()
    except UnicodeEncodeError as e:  # a lone surrogate: os.environ's stand-in for a byte not UTF-8
        raise DocumentInvalid(f"not valid UTF-8 text: character {e.start:,} is "
                              f"{text[e.start]!a}") from e
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        if "nesting depth" in (e.problem or "") and mark is not None:
            # libyaml's own bound (1000 levels), met while it scans ahead of our count.
            raise DocumentInvalid(f"nested deeper than {limits.max_depth} levels "
                                  "(the limit of max_depth)", line=mark.line + 1,
                                  column=mark.column + 1, limit="max_depth") from e
        raise DocumentInvalid(f"not valid YAML: {_clip(str(e))}") from e
    except yaml.YAMLError as e:
        raise DocumentInvalid(f"not valid YAML: {_clip(str(e))}") from e
    if len(documents) != 1:
        raise DocumentInvalid(f"expected one YAML document, found {len(documents)}")
    return documents[0]


def _events(text: str) -> Any:
    """An event source with ``get_event()``: libyaml's parser when PyYAML was built with it."""
    if yaml.__with_libyaml__:
        # yaml.cyaml re-exports libyaml's parser without declaring it (hence the ignore).
        return yaml.cyaml.CParser(text)  # type: ignore[attr-defined]
    return _PythonEvents(text)


class _PythonEvents(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's own reader, scanner and parser: events without a composer."""

    def __init__(self, text: str) -> None:
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)  # type: ignore[no-untyped-call]
        yaml.parser.Parser.__init__(self)  # type: ignore[no-untyped-call]


class _Builder:
    """Events to values, counting every value (an alias at the size of what it names)."""

    def __init__(self, source: Any, limits: DocumentLimits) -> None:
        self.source = source
        self.limits = limits
        self.nodes = 0

    def documents(self) -> list[Any]:
        found: list[Any] = []
        while True:
            event = self.source.get_event()
            if isinstance(event, ev.DocumentStartEvent):
                value = self.document()
                if value is not None:
                    found.append(value)
            elif isinstance(event, ev.StreamEndEvent):
                return found

    def document(self) -> Any:
        # The hot loop of every load: locals, not attributes, and strings decided inline.
        get_event = self.source.get_event
        max_nodes, max_depth = self.limits.max_nodes, self.limits.max_depth
        max_chars = self.limits.max_scalar_chars
        scalar_event, alias_event = ev.ScalarEvent, ev.AliasEvent
        implicit = _IMPLICIT
        nodes = self.nodes
        # Anchor -> (value, values it stands for); None while its own node is still open.
        anchors: dict[str, tuple[Any, int] | None] = {}
        # Open collections, innermost last, each [value, anchor, values before it, pending key,
        # {key: line}]: lists, not objects, as this loop runs once per event.
        stack: list[list[Any]] = []
        root: Any = None
        while True:
            event = get_event()
            kind = type(event)
            if kind is scalar_event:
                value = event.value
                if event.tag is not None or len(value) > max_chars or (
                        event.implicit[0] and value[:1] in implicit):
                    value = self.scalar(event)
                nodes += 1
                if event.anchor is not None:
                    self.define(anchors, event)
                    anchors[event.anchor] = (value, 1)
            elif kind is alias_event:
                if event.anchor not in anchors:
                    raise self.error(event, f"alias *{_clip(event.anchor, 40)} names no anchor before it")
                named = anchors[event.anchor]
                if named is None:
                    raise self.error(event, f"alias *{_clip(event.anchor, 40)} is inside the node it "
                                            "names (a recursive structure)")
                value, weight = named
                nodes += weight
            elif kind is ev.MappingStartEvent or kind is ev.SequenceStartEvent:
                is_mapping = kind is ev.MappingStartEvent
                if event.tag not in (_MAPPING_TAGS if is_mapping else _SEQUENCE_TAGS):
                    raise self.error(event, f"tag {_clip(event.tag, 60)} is not supported: "
                                            f"a {'mapping' if is_mapping else 'sequence'} is read as is")
                if len(stack) >= max_depth:
                    raise self.error(event, f"nested deeper than {max_depth} levels "
                                            "(the limit of max_depth)", limit="max_depth")
                if event.anchor is not None:
                    self.define(anchors, event)
                    anchors[event.anchor] = None
                stack.append([{} if is_mapping else [], event.anchor, nodes, _NO_KEY, None])
                nodes += 1
                continue
            elif kind is ev.MappingEndEvent or kind is ev.SequenceEndEvent:
                closed = stack.pop()
                value = closed[0]
                if closed[1] is not None:
                    anchors[closed[1]] = (value, nodes - closed[2])
            elif kind is ev.DocumentEndEvent:
                self.nodes = nodes
                return root
            else:  # pragma: no cover - the parser emits nothing else inside a document
                raise self.error(event, f"unexpected {kind.__name__}")
            if nodes > max_nodes:
                raise self.error(event, f"the document expands to more than {max_nodes:,} values "
                                        "(the limit of max_nodes; an alias counts as a copy of what "
                                        "it names)", limit="max_nodes")
            if not stack:
                root = value
                continue
            top = stack[-1]
            container = top[0]
            if type(container) is list:
                container.append(value)
            elif top[3] is _NO_KEY:
                self.key(top, value, event)
            else:
                container[top[3]] = value
                top[3] = _NO_KEY

    def key(self, top: list[Any], key: Any, event: Any) -> None:
        if isinstance(key, (list, dict)):
            raise self.error(event, "a mapping key must be a scalar, not a "
                                    f"{'mapping' if isinstance(key, dict) else 'sequence'}")
        lines = top[4]
        if lines is None:
            lines = top[4] = {}
        first = lines.get(key)
        if first is not None:
            raise self.error(event, f"duplicate key {preview(key)} (first on line {first})")
        lines[key] = event.start_mark.line + 1
        top[3] = key

    def scalar(self, event: Any) -> Any:
        """A scalar that may not be a string: typed by its tag, or by YAML 1.1's patterns."""
        text: str = event.value
        if len(text) > self.limits.max_scalar_chars:
            raise self.error(event, f"a scalar of {len(text):,} characters, longer than "
                                    f"{self.limits.max_scalar_chars:,} (the limit of max_scalar_chars)",
                             limit="max_scalar_chars")
        tag = event.tag
        if tag is None:
            if not event.implicit[0]:  # quoted or block: a string
                return text
            if text.isdigit() and text.isascii() and (text[0] != "0" or len(text) == 1) \
                    and len(text) <= 18:
                return int(text)  # the common integer (within int64), without the patterns
            # The type YAML 1.1 gives a plain scalar, as PyYAML's resolver finds it (none: a
            # string). Inline, as this is the slowest path a hostile document can choose.
            for candidate, pattern in (_IMPLICIT_DOTTED if "." in text else _IMPLICIT_UNDOTTED).get(
                    text[:1], ()):
                if pattern.match(text):
                    tag = candidate
                    break
            else:
                return text
            if tag == _FLOAT:
                return _yaml_float(text)
        elif tag == "!" or tag == _STR:
            return text
        convert = _CONVERTERS.get(tag)
        if convert is None:
            if tag == _MERGE:
                raise self.error(event, "merge keys (<<) are not supported: write the fields out")
            raise self.error(event, f"tag {_clip(tag, 60)} is not supported")
        if tag == _INT and len(text) > _INT_MAX_CHARS:
            raise self.error(event, f"an integer of {len(text):,} characters does not fit in "
                                    "a signed 64-bit integer", limit="int64")
        try:
            value = convert(text)
        except ValueError:
            raise self.error(event, f"{preview(text)} is not a valid {tag.rsplit(':', 1)[-1]}") from None
        if tag == _INT and not INT_MIN <= value <= INT_MAX:
            raise self.error(event, f"{preview(text)} does not fit in a signed 64-bit integer",
                             limit="int64")
        return value

    def define(self, anchors: Mapping[str, Any], event: Any) -> None:
        if event.anchor in anchors:
            raise self.error(event, f"anchor &{_clip(event.anchor, 40)} is defined twice")

    def error(self, event: Any, message: str, *, limit: str | None = None) -> DocumentInvalid:
        mark = event.start_mark
        if mark is None:
            return DocumentInvalid(message, limit=limit)
        return DocumentInvalid(message, line=mark.line + 1, column=mark.column + 1, limit=limit)


def _yaml_null(text: str) -> None:
    return None


def _yaml_bool(text: str) -> bool:
    value = _BOOLS.get(text.lower())
    if value is None:
        raise ValueError(text)
    return value


def _yaml_int(text: str) -> int:
    """A YAML 1.1 integer: ``1_000``, ``0b101``, ``0x1f``, ``017`` (octal), ``1:30`` (base 60)."""
    digits = text.replace("_", "")
    sign = -1 if digits[:1] == "-" else 1
    digits = digits.lstrip("+-") if digits[:1] in ("+", "-") else digits
    if digits[:2] == "0b":
        return sign * int(digits[2:], 2)
    if digits[:2] == "0x":
        return sign * int(digits[2:], 16)
    if len(digits) > 1 and digits[0] == "0":
        return sign * int(digits, 8)
    if ":" in digits:
        number = 0
        for part in digits.split(":"):
            number = number * 60 + int(part)
        return sign * number
    return sign * int(digits)


def _yaml_float(text: str) -> float:
    """A YAML 1.1 float: ``1.5``, ``1.0e+3``, ``.inf``, ``.nan``, ``1:30.5`` (base 60)."""
    try:
        return float(text)  # the common spelling; Python reads '1_0.5' as YAML does
    except ValueError:
        pass
    digits = text.replace("_", "").lower()
    sign = -1.0 if digits[:1] == "-" else 1.0
    digits = digits[1:] if digits[:1] in ("+", "-") else digits
    if digits == ".inf":
        return sign * math.inf
    if digits == ".nan":
        return math.nan
    if ":" in digits:
        number = 0.0
        for part in digits.split(":"):
            number = number * 60 + float(part)
        return sign * number
    return sign * float(digits)


_CONVERTERS: dict[str, Any] = {_NULL: _yaml_null, _BOOL: _yaml_bool, _INT: _yaml_int, _FLOAT: _yaml_float}


def _clip(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
