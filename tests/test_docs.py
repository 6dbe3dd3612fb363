"""Every code block of the documentation runs, page by page, as a reader would run it.

docs/hooks.py reads the blocks (the same reader the site build uses to run the tutorials); here each
page runs in order in one namespace on the embedded SmolLM2, loaded once per session. Pages about a
server get a real `interlace serve` process, found through INTERLACE_HOST / INTERLACE_API_KEY as a
user's client would. The pages' own `assert`s are the claims they make.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import assert_clean
from server.serving import Server

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hooks)

PAGES = sorted(str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md"))
RUNNABLE = [page for page in PAGES if hooks.blocks(DOCS / page)]
SERVED = {"remote/serving.md", "remote/client.md", "remote/wire-format.md"}  # pages whose code talks to a server


@pytest.fixture(scope="session")
def docs_server(tmp_path_factory):
    """`interlace serve smollm2` as docs/remote/serving.md starts it, and a key made by the CLI."""
    db = str(tmp_path_factory.mktemp("docs-server") / "keys.db")
    created = subprocess.run([sys.executable, "-m", "interlace", "keys", "create", "--db", db, "--name", "alice"],
                             capture_output=True, text=True, check=True)
    key = created.stdout.split()[-1]
    # one thread: on a shared two-core machine a server's thread pool slows every process down
    server = Server("smollm2", db, "--standardized", ready_within=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield server.url, key
    server.stop()


@pytest.mark.parametrize("page", RUNNABLE)
def test_page_runs(page, one_thread, smollm2, smollm2_standardized, tmp_path, monkeypatch, request):
    if page in SERVED:
        url, key = request.getfixturevalue("docs_server")
        monkeypatch.setenv("INTERLACE_HOST", url)
        monkeypatch.setenv("INTERLACE_API_KEY", key)
    text = (DOCS / page).read_text()
    with hooks.shared_default_models(smollm2, smollm2_standardized), hooks.working_directory(tmp_path):
        ran = hooks.run_page(DOCS / page, {"__name__": "__main__"})
    assert ran == len(hooks.blocks(DOCS / page)) == text.count("```python\n")
    # every figure the page shows is written by the page's own code
    for figure in re.findall(r'src="figures/([\w.-]+)"', text):
        html = (tmp_path / "figures" / figure).read_text()
        assert "Plotly.newPlot" in html and (tmp_path / "figures" / "plotly.min.js").exists(), figure
    assert_clean(smollm2.module)


def test_every_page_is_in_the_nav():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)

    def listed(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from listed(value) if isinstance(value, list) else [value]

    assert sorted(listed(config["nav"])) == PAGES


def test_a_mistyped_fence_is_an_error(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```py\nprint(1)\n```\n")
    with pytest.raises(ValueError, match=r"page.md:3: a ```py block"):
        hooks.blocks(page)


def test_errors_name_the_page_and_its_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# title\n\n```python\nx = 1\n```\n\nprose\n\n```python\nx = x +\n```\n")
    with pytest.raises(SyntaxError) as error:
        hooks.run_page(page, {})
    assert error.value.filename == str(page) and error.value.lineno == 10
