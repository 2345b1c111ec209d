"""Edit a YAML document by splicing text, so that everything not edited stays byte for byte.

ruamel.yaml's round-trip loader gives the tree with the line and column of
every key and item. A generator changes that tree only through
``Splicer.set`` (replace or add a mapping key) and ``Splicer.append`` (add
an item to a sequence); ``Splicer.text()`` then writes only those changes
into the original text: new items and keys are rendered by ruamel.yaml with
the indentation detected from the input and inserted after the last line of
the collection they extend; a replaced value takes the place of the old
value's lines. Comments, key order, quoting, indentation, line wrapping and
block scalars of the rest are the input's own. ``text()`` checks that the
result parses to exactly the edited tree.
"""
from __future__ import annotations

import io
import json
import re

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq


class SpliceError(Exception):
    """The edit cannot be written into the text (a bug or an input shape not handled)."""


def plain(node):
    """The tree as plain dicts, lists and scalars (for comparing documents)."""
    if isinstance(node, dict):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    if isinstance(node, str):
        return str(node)
    return node


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _blank(line: str) -> bool:
    return line.strip() == ""


def _comment(line: str) -> bool:
    return line.lstrip(" ").startswith("#")


class Splicer:
    def __init__(self, text: str, root: CommentedMap):
        self.lines = text.splitlines(keepends=True)
        if self.lines and not self.lines[-1].endswith("\n"):
            self.lines[-1] += "\n"
        self.root = root
        self.parent: dict[int, tuple] = {}       # id(collection) -> (parent mapping, key)
        self.orig_len: dict[int, int] = {}       # id(original sequence) -> its length
        self.orig: dict[int, object] = {}        # id -> node, the collections of the input
        self._index(root)
        self.edits: list[tuple[str, object, object]] = []
        self.mapping, self.sequence, self.offset = self._style()

    # --- the input ---------------------------------------------------------------
    def _index(self, node, parent=None, key=None) -> None:
        if not isinstance(node, (CommentedMap, CommentedSeq)):
            return
        self.orig[id(node)] = node
        if parent is not None:
            self.parent[id(node)] = (parent, key)
        if isinstance(node, CommentedSeq):
            self.orig_len[id(node)] = len(node)
            for i, v in enumerate(node):
                self._index(v, node, i)
        else:
            for k, v in node.items():
                self._index(v, node, k)

    def _style(self) -> tuple[int, int, int]:
        """(mapping indent, sequence indent, dash offset) the input uses, as ruamel counts them."""
        mapping = seq = off = None
        stack = [self.root]
        while stack and (mapping is None or seq is None):
            n = stack.pop(0)
            if isinstance(n, CommentedMap):
                for k, v in n.items():
                    if not self._block(v) or not len(v):
                        continue
                    kcol = n.lc.key(k)[1]
                    if isinstance(v, CommentedMap) and mapping is None:
                        mapping = v.lc.key(next(iter(v)))[1] - kcol
                    if isinstance(v, CommentedSeq) and seq is None:
                        line, col = v.lc.item(0)
                        dash = self.lines[line].rfind("-", 0, col)
                        if dash >= kcol:
                            off, seq = dash - kcol, col - kcol
                    stack.append(v)
            elif isinstance(n, CommentedSeq):
                stack.extend(v for v in n if self._block(v))
        mapping = mapping or 2
        if seq is None:
            seq, off = mapping + 2, mapping
        return mapping, seq, off

    def _block(self, node) -> bool:
        """Is this a non-empty collection of the input, written in block style?"""
        if self.orig.get(id(node)) is not node or not len(node):
            return False
        p = self.parent.get(id(node))
        if p is None:
            return True
        pm, pk = p
        line, col = pm.lc.value(pk) if isinstance(pm, CommentedMap) else pm.lc.item(pk)
        return self.lines[line][col:col + 1] not in ("[", "{")

    def _is_orig(self, node) -> bool:
        return self.orig.get(id(node)) is node

    # --- the edits ---------------------------------------------------------------
    def set(self, mapping: CommentedMap, key, value) -> None:
        existed = key in mapping
        mapping[key] = value
        if self._is_orig(mapping):
            self.edits.append(("replace" if existed else "add", mapping, key))

    def append(self, seq: CommentedSeq, item) -> None:
        seq.append(item)
        if self._is_orig(seq):
            self.edits.append(("append", seq, None))

    # --- writing them -------------------------------------------------------------
    def _yaml(self) -> YAML:
        y = YAML()
        y.indent(mapping=self.mapping, sequence=self.sequence, offset=self.offset)
        y.width = 4096
        return y

    def _render(self, data, col: int) -> list[str]:
        out = io.StringIO()
        self._yaml().dump(data, out)
        return [(" " * col + ln if ln.strip() else ln) for ln in out.getvalue().splitlines(keepends=True)]

    def _end(self, line: int, col: int, block_scalar: bool) -> int:
        """The last line of the value of the key at (line, col)."""
        last = line
        for j in range(line + 1, len(self.lines)):
            ln = self.lines[j]
            if _blank(ln):
                continue
            ind = _indent(ln)
            if block_scalar:
                if ind <= col:
                    break
                last = j
                continue
            if _comment(ln):
                continue
            if ln.startswith(("---", "...")) and ind == 0:
                break
            if ind > col or (ind == col and ln[col:col + 2] in ("- ", "-\n")):
                last = j
                continue
            break
        return last

    def _key_end(self, mapping: CommentedMap, key) -> int:
        kl, kc = mapping.lc.key(key)
        vl, vc = mapping.lc.value(key)
        block = self.lines[vl][vc:vc + 1] in ("|", ">")
        return self._end(kl, kc, block)

    def _mapping_end(self, mapping: CommentedMap) -> int:
        return max(self._key_end(mapping, k) for k in mapping if self._orig_key(mapping, k))

    def _orig_key(self, mapping, key) -> bool:
        try:
            return mapping.lc.key(key) is not None and mapping.lc.key(key)[0] is not None
        except KeyError:
            return False

    def text(self) -> str:
        # after line -> [(column, new lines)]: at one line, the deeper collection's first
        inserts: dict[int, list[tuple[int, list[str]]]] = {}
        replaces: dict[int, tuple[int, list[str]]] = {}   # first line -> (last line, new lines)
        done = set()
        for kind, node, key in self.edits:
            # an edit inside a flow collection rewrites that collection, in block style
            if kind in ("append", "add") and not self._block(node):
                node, key = self.parent[id(node)]
                kind = "replace"
                if not isinstance(node, CommentedMap):
                    raise SpliceError("cannot edit a flow collection that is a sequence item")
            mark = (kind, id(node), key)
            if mark in done:
                continue
            done.add(mark)
            if kind == "append":
                pm, pk = self.parent[id(node)]
                line, col = node.lc.item(0)
                dash = self.lines[line].rfind("-", 0, col)
                new = node[self.orig_len[id(node)]:]
                y = self._yaml()
                y.indent(mapping=self.mapping, sequence=col - dash, offset=0)
                out = io.StringIO()
                y.dump(CommentedSeq(new), out)
                lines = [(" " * dash + ln if ln.strip() else ln)
                         for ln in out.getvalue().splitlines(keepends=True)]
                end = self._key_end(pm, pk) if isinstance(pm, CommentedMap) else None
                if end is None:
                    raise SpliceError("cannot append to a sequence inside a sequence")
                inserts.setdefault(end, []).append((dash, lines))
            elif kind == "add":
                k0 = next(k for k in node if self._orig_key(node, k))
                col = node.lc.key(k0)[1]
                end = self._mapping_end(node)
                inserts.setdefault(end, []).append(
                    (col, self._render(CommentedMap([(key, node[key])]), col)))
            else:
                kl, kc = node.lc.key(key)
                end = self._key_end(node, key)
                rendered = self._render(CommentedMap([(key, node[key])]), 0)
                vl, vc = node.lc.value(key)
                if (end == kl and vl == kl and len(rendered) == 1
                        and not isinstance(node[key], (dict, list))):
                    # a one-line scalar: replace the value only, keep what follows (a comment)
                    rest = self.lines[kl][vc:]
                    tok = re.match(r"""("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^#\n]*?)(\s+#.*)?\n?$""",
                                   rest)
                    val = rendered[0][len(str(key)) + 2:].rstrip("\n")
                    if rest[:1] in ("'", '"') and val[:1] not in ("'", '"'):
                        val = (json.dumps(str(node[key])) if rest[0] == '"'
                               else "'" + str(node[key]).replace("'", "''") + "'")
                    new_line = self.lines[kl][:vc] + val + rest[len(tok.group(1)):]
                    replaces[kl] = (kl, [new_line])
                else:
                    first = self.lines[kl][:kc] + rendered[0]
                    replaces[kl] = (end, [first] + [(" " * kc + ln if ln.strip() else ln)
                                                    for ln in rendered[1:]])
        out: list[str] = []
        i = 0
        while i < len(self.lines):
            if i in replaces:
                last, new = replaces[i]
                out.extend(new)
                for j in range(i, last + 1):
                    if j in inserts and j != last:
                        raise SpliceError("overlapping edits")
                i = last
            else:
                out.append(self.lines[i])
            for _, new in sorted(inserts.get(i, []), key=lambda x: -x[0]):
                out.extend(new)
            i += 1
        result = "".join(out)
        check = YAML(typ="safe", pure=True).load(result)
        if plain(check) != plain(self.root):
            raise SpliceError("the edited text does not hold the edited document")
        return result
