"""The docs' code blocks as programs: reading a page's Python blocks and running them in order.

Every ```python block of a page runs, top to bottom, in one namespace (a page reads like one
script); ```bash and ```text blocks show shell commands and their output and are the only ones not
run. `tests/test_docs.py` runs every page this way. As a MkDocs hook, the build runs each tutorial
page the same way, in the folder its HTML is written to, so the figures the page's code writes
(`figures/NAME.html`) are the figures the site shows.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
SHOWN_ONLY = {"bash", "text"}  # shell commands and their output: shown, never run
TUTORIALS = "tutorials"


def blocks(page: Path) -> list[tuple[int, str]]:
    """The page's Python blocks as (first line, code). Any other fence language is an error, so a
    block cannot silently escape the tests by a typo (```py)."""
    text, found = page.read_text(), []
    for match in FENCE.finditer(text):
        language, code = match.groups()
        line = text.count("\n", 0, match.start(2)) + 1
        if language == "python":
            found.append((line, code))
        elif language not in SHOWN_ONLY:
            raise ValueError(f"{page}:{line - 1}: a ```{language or '(no language)'} block; write ```python "
                             f"(it runs), or ```bash / ```text for a shell command or its output")
    return found


def run_page(page: Path, namespace: dict) -> int:
    """Run the page's Python blocks in order in `namespace`; returns how many ran. Line numbers in
    tracebacks (and in interlace's errors) are the page's own."""
    count = 0
    for line, code in blocks(page):
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
        count += 1
    return count


@contextlib.contextmanager
def working_directory(path: Path):
    """Run with `path` as the current directory, `path/figures` ready for the page's figures."""
    (path / "figures").mkdir(parents=True, exist_ok=True)
    before = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(before)


@contextlib.contextmanager
def shared_default_models(lm=None, standardized=None):
    """While open, `LanguageModel.default()` and `StandardizedTransformer.default()` return one
    loaded embedded model (`lm`, or loaded on first use) and its standardized view, so pages share a
    load instead of paying one each."""
    import interlace

    loaded = {"lm": lm, "st": standardized}

    def language(cls, **kwargs):
        if loaded["lm"] is None:
            loaded["lm"] = interlace.LanguageModel(interlace.models.language.DEFAULT_MODEL, dispatch=True)
        return loaded["lm"]

    def standardized_view(cls, **kwargs):
        if loaded["st"] is None:
            lm = language(interlace.LanguageModel)
            loaded["st"] = interlace.StandardizedTransformer(lm.module, tokenizer=lm.tokenizer)
        return loaded["st"]

    classes = (interlace.LanguageModel, interlace.StandardizedTransformer)
    originals = [vars(cls).get("default") for cls in classes]  # None: inherited
    interlace.LanguageModel.default = classmethod(language)
    interlace.StandardizedTransformer.default = classmethod(standardized_view)
    try:
        yield
    finally:
        for cls, original in zip(classes, originals):
            if original is None:
                del cls.default
            else:
                cls.default = original


# -- the MkDocs hook: tutorials run at build time and write their figures into the site ------------
_figures: dict[str, dict[str, bytes]] = {}  # page text hash -> its figures (`mkdocs serve` rebuilds often)


def on_post_build(config, **kwargs) -> None:
    docs, site = Path(config["docs_dir"]), Path(config["site_dir"])
    target = site / TUTORIALS / "figures"
    target.mkdir(parents=True, exist_ok=True)
    with shared_default_models():
        for page in sorted((docs / TUTORIALS).glob("*.md")):
            key = hashlib.sha256(page.read_bytes()).hexdigest()
            if key not in _figures:
                with tempfile.TemporaryDirectory() as folder, working_directory(Path(folder)):
                    run_page(page, {"__name__": "__main__"})
                    _figures[key] = {path.name: path.read_bytes() for path in Path("figures").iterdir()}
            for name, data in _figures[key].items():
                (target / name).write_bytes(data)
