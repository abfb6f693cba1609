"""The experiment file's YAML: plain data with line numbers, YAML 1.2 numbers, bounded size.

``load_yaml(path)`` returns plain data whose mappings (:class:`LDict`) and lists (:class:`LList`)
remember the 1-based line of themselves and of each key/item, so every later error can say
``file:line``. Every problem is a :class:`~ssflctl.errors.UserError` of one line.

Numbers follow the YAML 1.2 core schema (YAML 1.2.2, section 10.3.2 "Tag Resolution"), not
PyYAML's YAML 1.1 rules, because researchers write ``lr: 1e-3``:

* int:   ``[-+]?[0-9]+`` | ``0o[0-7]+`` | ``0x[0-9a-fA-F]+``        (``010`` is 10, not 8)
* float: ``[-+]?(\\.[0-9]+|[0-9]+(\\.[0-9]*)?)([eE][-+]?[0-9]+)?`` (``1e-3``, ``5E-4``, ``.5``, ``+1e3``)
  and ``[-+]?\\.(inf|Inf|INF)``, ``\\.(nan|NaN|NAN)`` (recognised here; refused later wherever
  a finite number is needed).

One extension, as the user means it: ``_`` between digits (``1_000`` is 1000), as in YAML 1.1 and
Python (PEP 515). YAML 1.1 forms that are not 1.2 numbers (``0b1010``, sexagesimal ``1:30``) are
strings, so ``time: 24:00:00`` is the string a Slurm time limit is. Booleans, null, merge keys and
timestamps keep PyYAML's (1.1) resolution.

Limits, checked before the work they bound (issue 20.4): the file's size (:data:`MAX_BYTES`,
before reading it), UTF-8 and YAML's printable characters (a NUL byte is refused with its line),
nesting depth (:data:`MAX_DEPTH`) and the number of nodes *after* alias expansion
(:data:`MAX_NODES`), both counted by an iterative composer while the events are read, so a
400-byte alias bomb or a 100 000-deep list is refused in milliseconds. The C parser
(``yaml.CSafeLoader``, libyaml) is used where PyYAML was built with it; its events carry the marks
that give the line numbers.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml
from yaml.constructor import ConstructorError
from yaml.composer import ComposerError
from yaml.events import (AliasEvent, DocumentEndEvent, MappingEndEvent, MappingStartEvent, ScalarEvent,
                         SequenceEndEvent, SequenceStartEvent, StreamEndEvent)
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from ssflctl.errors import UserError

MAX_BYTES = 1_000_000   # an experiment file is a few KB; a 100 MB annotation JSON is refused unread
MAX_NODES = 100_000     # scalars + collections after alias expansion
MAX_DEPTH = 64          # nested mappings/lists

INT_TAG = "tag:yaml.org,2002:int"
FLOAT_TAG = "tag:yaml.org,2002:float"
MERGE_TAG = "tag:yaml.org,2002:merge"
MAP_TAG = "tag:yaml.org,2002:map"
SEQ_TAG = "tag:yaml.org,2002:seq"

_D = r"[0-9]+(?:_[0-9]+)*"
INT_RE = re.compile(rf"^(?:[-+]?{_D}|0o[0-7]+|0x[0-9a-fA-F]+)$")
FLOAT_RE = re.compile(rf"^(?:[-+]?(?:\.{_D}|{_D}(?:\.(?:{_D})?)?)(?:[eE][-+]?[0-9]+)?"
                      r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
#: characters YAML allows in a stream (YAML 1.2.2 section 5.1 "Character Set")
_NON_PRINTABLE = re.compile("[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF]")


def looks_like_number(s: str) -> bool:
    """True when ``s`` unquoted would be a YAML 1.2 number here (so a string like it was quoted)."""
    s = s.strip()
    return bool(INT_RE.match(s) or FLOAT_RE.match(s))


class LDict(dict):
    """A mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    lines: Dict[Any, int]


class LList(list):
    line: int = 0
    lines: List[int]


_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _loader_class(base: type) -> type:
    """``base`` (CSafeLoader or SafeLoader) with YAML 1.2 numbers and line-numbered containers."""
    # PyYAML's 1.1 int/float resolvers out, the 1.2 ones in; the rest (bool, null, merge, timestamp,
    # value) unchanged
    cls = type(f"Experiment{base.__name__}", (base,), {"yaml_implicit_resolvers": {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (INT_TAG, FLOAT_TAG)]
        for first, resolvers in base.yaml_implicit_resolvers.items()}})
    cls.add_implicit_resolver(INT_TAG, INT_RE, list("-+0123456789"))
    cls.add_implicit_resolver(FLOAT_TAG, FLOAT_RE, list("-+0123456789."))
    cls.add_constructor(INT_TAG, _construct_int)
    cls.add_constructor(FLOAT_TAG, _construct_float)
    cls.add_constructor(MAP_TAG, _construct_mapping)
    cls.add_constructor(SEQ_TAG, _construct_sequence)
    return cls


def _construct_int(loader: Any, node: ScalarNode) -> int:
    s = str(loader.construct_scalar(node)).replace("_", "")
    try:
        if len(s) > 400:
            raise ValueError("too many digits")
        if s[:2] in ("0o", "0x"):
            return int(s[2:], 8 if s[1] == "o" else 16)
        return int(s)
    except ValueError as exc:
        raise ConstructorError(None, None, f"not an integer: {s[:40]!r} ({exc})", node.start_mark)


def _construct_float(loader: Any, node: ScalarNode) -> float:
    s = str(loader.construct_scalar(node)).replace("_", "").lower()
    if s in (".inf", "+.inf"):
        return float("inf")
    if s == "-.inf":
        return float("-inf")
    if s == ".nan":
        return float("nan")
    try:
        if len(s) > 400:
            raise ValueError("too many digits")
        return float(s)
    except ValueError as exc:
        raise ConstructorError(None, None, f"not a number: {s[:40]!r} ({exc})", node.start_mark)


def _flat_pairs(loader: Any, node: MappingNode) -> Tuple[list, list]:
    """(pairs from ``<<`` merge keys, explicit pairs) of a mapping node; later pairs win.

    YAML merge key (https://yaml.org/type/merge.html): explicit keys override merged ones, and in
    ``<<: [*a, *b]`` the earlier mapping wins, so ``*b``'s pairs come first. Memoised per node:
    a merged mapping was anchored (and so constructed) earlier in the document.
    """
    memo = loader.__dict__.setdefault("_flat_memo", {})
    if id(node) in memo:
        return memo[id(node)]
    merged: list = []
    explicit: list = []
    for key_node, value_node in node.value:
        if key_node.tag != MERGE_TAG:
            explicit.append((key_node, value_node))
            continue
        if isinstance(value_node, MappingNode):
            subs = [value_node]
        elif isinstance(value_node, SequenceNode) and all(isinstance(s, MappingNode) for s in value_node.value):
            subs = list(value_node.value)
        else:
            raise ConstructorError("while constructing a mapping", node.start_mark,
                                   "a merge key (<<) needs a mapping or a list of mappings", value_node.start_mark)
        for sub in reversed(subs):
            m, e = _flat_pairs(loader, sub)
            merged.extend(m + e)
    memo[id(node)] = (merged, explicit)
    return merged, explicit


def _construct_mapping(loader: Any, node: MappingNode) -> LDict:
    merged, explicit = _flat_pairs(loader, node)
    out = LDict()
    out.line = node.start_mark.line + 1
    out.lines = {}
    from_merge = set()
    for i, (key_node, value_node) in enumerate(merged + explicit):
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise UserError(f"{loader.name}:{line}: a mapping key must be a plain value, not {type(key).__name__}")
        is_merged = i < len(merged)
        if key in out and key not in from_merge:
            shown = key if isinstance(key, str) and key.isprintable() and key.strip() == key and key else repr(key)
            raise UserError(f"{loader.name}:{line}: {shown}: duplicate key (first on line {out.lines[key]}); keep one")
        if is_merged:
            from_merge.add(key)
        else:
            from_merge.discard(key)
        out.pop(key, None)  # an explicit key after a merged one: its place is where it is written
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


def _construct_sequence(loader: Any, node: SequenceNode) -> LList:
    out = LList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.lines = [child.start_mark.line + 1 for child in node.value]
    return out


#: the loader used: libyaml's parser where PyYAML has it; PyLoader is the pure-Python twin (tests)
Loader = _loader_class(_Base)
PyLoader = _loader_class(yaml.SafeLoader)


def _limit(name: str, mark, what: str) -> UserError:
    return UserError(f"{name}:{mark.line + 1}: {what}")


def compose(loader: Any, name: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH):
    """The document's node graph, built iteratively from the parser's events (no recursion), with
    depth and expanded-node-count limits. None for an empty stream."""
    loader.get_event()  # StreamStart
    if loader.check_event(StreamEndEvent):
        loader.get_event()
        return None
    loader.get_event()  # DocumentStart
    anchors: Dict[str, Any] = {}
    sizes: Dict[int, int] = {}  # id(node) -> nodes after alias expansion
    stack: List[list] = []      # [node, anchor, expanded size, pending key (mappings)]
    root = None

    def finish(node, size: int) -> None:
        nonlocal root
        if not stack:
            root = node
            return
        frame = stack[-1]
        frame[2] += size
        if frame[2] > max_nodes:
            raise _limit(name, node.start_mark, f"the file expands to more than {max_nodes} values (YAML aliases "
                                                "repeat what they point to); an experiment file needs far fewer")
        parent = frame[0]
        if isinstance(parent, SequenceNode):
            parent.value.append(node)
        elif frame[3] is None:
            frame[3] = node
        else:
            parent.value.append((frame[3], node))
            frame[3] = None

    def remember(anchor, node, size: int) -> None:
        sizes[id(node)] = size
        if anchor is not None:
            if anchor in anchors:
                raise ComposerError("found duplicate anchor %r; first occurrence" % anchor,
                                    anchors[anchor].start_mark, "second occurrence", node.start_mark)
            anchors[anchor] = node

    while root is None:
        ev = loader.get_event()
        if isinstance(ev, AliasEvent):
            if ev.anchor not in anchors:
                raise ComposerError(None, None, f"found undefined alias {ev.anchor!r} (an alias must follow "
                                                "its anchor's complete node)", ev.start_mark)
            node = anchors[ev.anchor]
            finish(node, sizes[id(node)])
        elif isinstance(ev, ScalarEvent):
            tag = ev.tag
            if tag is None or tag == "!":
                tag = loader.resolve(ScalarNode, ev.value, ev.implicit)
            node = ScalarNode(tag, ev.value, ev.start_mark, ev.end_mark, style=ev.style)
            remember(ev.anchor, node, 1)
            finish(node, 1)
        elif isinstance(ev, (SequenceStartEvent, MappingStartEvent)):
            if len(stack) >= max_depth:
                raise _limit(name, ev.start_mark, f"nested more than {max_depth} levels deep; an experiment "
                                                  "file needs a few")
            seq = isinstance(ev, SequenceStartEvent)
            kind = SequenceNode if seq else MappingNode
            tag = ev.tag
            if tag is None or tag == "!":
                tag = loader.resolve(kind, None, ev.implicit)
            node = kind(tag, [], ev.start_mark, None, flow_style=ev.flow_style)
            stack.append([node, ev.anchor, 1, None])
        elif isinstance(ev, (SequenceEndEvent, MappingEndEvent)):
            node, anchor, size, _ = stack.pop()
            node.end_mark = ev.end_mark
            remember(anchor, node, size)
            finish(node, size)
        else:  # pragma: no cover - the parser only yields the events above inside a document
            raise ComposerError(None, None, f"unexpected {type(ev).__name__}", ev.start_mark)
    loader.get_event()  # DocumentEnd
    if not loader.check_event(StreamEndEvent):
        ev = loader.peek_event()
        raise ComposerError(None, None, "a second document (---) in the file; an experiment file is one document",
                            ev.start_mark)
    return root


def read_text(path: Path, max_bytes: int = MAX_BYTES) -> str:
    """The file's text, refusing (one line each) a missing, huge, non-UTF-8 or non-printable file."""
    try:
        st = os.stat(path)
        if not os.path.isfile(path):
            raise UserError(f"{path}: not a file; give the experiment file (YAML)")
        if st.st_size > max_bytes:
            raise UserError(f"{path}: {st.st_size} bytes, more than the {max_bytes} an experiment file may have; "
                            "is this the experiment file (YAML)?")
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise UserError(f"{path}: no such experiment file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the experiment file ({exc.strerror or exc})") from None
    if len(data) > max_bytes:  # grew while reading, or a special file
        raise UserError(f"{path}: more than the {max_bytes} bytes an experiment file may have")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
                        "save the experiment file as UTF-8") from None
    bad = _NON_PRINTABLE.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        raise UserError(f"{path}:{line}: the character {bad.group()!r} is not allowed in YAML; remove it")
    return text


def parse(text: str, name: str, loader_class: Optional[type] = None) -> Any:
    """Parse YAML text into line-numbered plain data (see the module doc for the rules)."""
    loader = (loader_class or Loader)(text)
    loader.name = name
    try:
        node = compose(loader, name)
        return None if node is None else loader.construct_document(node)
    except UserError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        what = exc.problem or exc.context or "invalid YAML"
        raise UserError(f"{name}:{line}: invalid YAML: {what}; fix the syntax") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{name}:1: invalid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:  # pragma: no cover - the depth limit comes first
        raise UserError(f"{name}:1: invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def load_yaml(path) -> Any:
    """Read and parse an experiment file: :func:`read_text` then :func:`parse`."""
    return parse(read_text(Path(path)), str(path))


def plain(data: Any) -> Any:
    """``data`` from :func:`parse` with built-in dicts and lists in place of :class:`LDict` and
    :class:`LList` (what ``yaml.safe_dump`` can write)."""
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [plain(v) for v in data]
    return data
