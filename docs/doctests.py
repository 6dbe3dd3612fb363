"""A griffe extension for the API reference: the `>>>` examples of docstrings become code blocks.

interlace's docstrings carry doctests (run by pytest's --doctest-modules) as plain text; rendered
as Markdown, `>>>` would read as nested quotes and `[...]` in their output as links. Fencing each
run of doctest lines (prompts, continuations and the output up to a blank line) shows them as code.
"""

from __future__ import annotations

import griffe


def fence_doctests(text: str) -> str:
    lines, out, inside = text.splitlines(), [], False
    for line in lines:
        stripped = line.lstrip()
        if not inside and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
            inside = True
        elif inside and not stripped:
            out.append(f"{indent}```")
            inside = False
        out.append(line)
    if inside:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_object(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
