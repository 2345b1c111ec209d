"""Where in a shell script a piece of text sits: which quoting applies there.

``contexts(script, spans)`` tells for each (start, end) span of ``script``
whether the shell sees it unquoted (``plain``), in double quotes
(``double``), in single quotes (``single``), in ANSI-C quotes (``ansi``), in
a comment (``comment``), in a here-document whose delimiter is quoted
(``heredoc-quoted``, not expanded) or unquoted (``heredoc``, expanded as in
double quotes). The spans are taken as opaque words (a Tekton variable such
as ``$(params.IMAGE)`` is one). It follows POSIX sh and bash well enough for
build scripts: quotes, backslashes, ``$(...)``/``(...)`` nesting, comments
and here-documents; not ``case`` patterns' parentheses or backquotes.
"""
from __future__ import annotations

import re

_DELIM = re.compile(r"""<<(-?)[ \t]*((?:[^\s;&|<>()"'\\]|\\.|"[^"]*"|'[^']*')+)""")


def contexts(script: str, spans: list[tuple[int, int]]) -> list[str]:
    starts = {s: e for s, e in spans}
    found: dict[int, str] = {}
    stack = ["plain"]            # plain (also inside $( ) and ( )), double, single, ansi
    pending: list[tuple[str, bool, bool]] = []   # here-documents opened on this line
    i, n = 0, len(script)
    while i < n:
        top = stack[-1]
        if i in starts:
            found[i] = top
            i = starts[i]
            continue
        c = script[i]
        if top == "single":
            if c == "'":
                stack.pop()
        elif top == "ansi":
            if c == "\\":
                i += 1
            elif c == "'":
                stack.pop()
        elif top == "double":
            if c == "\\":
                i += 1
            elif c == '"':
                stack.pop()
            elif script.startswith("$(", i):
                stack.append("plain")
                i += 1
        else:   # plain
            if c == "\\":
                i += 1
            elif c == "'":
                stack.append("single")
            elif script.startswith("$'", i):
                stack.append("ansi")
                i += 1
            elif c == '"':
                stack.append("double")
            elif c == "(":
                stack.append("plain")
            elif c == ")" and len(stack) > 1:
                stack.pop()
            elif c == "#" and (i == 0 or script[i - 1] in " \t\n;&|()"):
                end = script.find("\n", i)
                end = n if end < 0 else end
                for s in starts:
                    if i <= s < end:
                        found[s] = "comment"
                i = end
                continue
            elif script.startswith("<<", i) and not script.startswith("<<<", i):
                m = _DELIM.match(script, i)
                if m:
                    word = m.group(2)
                    quoted = any(q in word for q in "\"'\\")
                    delim = re.sub(r"""["'\\]""", "", word)
                    pending.append((delim, quoted, m.group(1) == "-"))
                    i = m.end()
                    continue
            elif c == "\n" and pending:
                i += 1
                for delim, quoted, strip_tabs in pending:
                    while i < n:
                        end = script.find("\n", i)
                        end = n if end < 0 else end
                        line = script[i:end]
                        if (line.lstrip("\t") if strip_tabs else line) == delim:
                            i = end + 1
                            break
                        for s in starts:
                            if i <= s < end:
                                found[s] = "heredoc-quoted" if quoted else "heredoc"
                        i = end + 1
                pending = []
                continue
        i += 1
    return [found.get(s, stack[-1]) for s, _ in spans]
