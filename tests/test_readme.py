"""The README's example runs as written (on the real model, loaded once per session), and its links
lead to pages of the documentation (whose own examples tests/test_docs.py runs)."""

import re
from pathlib import Path

import torch

import interlace

from helpers import assert_clean

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_example_runs(smollm2, monkeypatch, capsys):
    monkeypatch.setattr(interlace.LanguageModel, "default", classmethod(lambda cls, **kw: smollm2))
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)
    # what the example promises
    assert isinstance(scope["hidden"], torch.Tensor) and scope["hidden"].shape[-1] == smollm2.config.hidden_size
    assert capsys.readouterr().out.startswith("True ")
    prompt_length = smollm2.tokenizer("Hello", return_tensors="pt").input_ids.shape[-1]
    assert scope["tokens"].shape[-1] == prompt_length + 5
    assert scope["cat"].shape[:2] == smollm2.tokenizer("The cat sat on the", return_tensors="pt").input_ids.shape
    assert_clean(smollm2.module)


def test_readme_links_lead_to_every_section_of_the_docs():
    links = re.findall(r"\]\((docs/[^)#]+)\)", README.read_text())
    assert links and all((ROOT / link).is_file() for link in links), [l for l in links if not (ROOT / l).is_file()]
    sections = {link.split("/")[1] if link.count("/") > 1 else link for link in links}
    assert {"features", "tutorials", "remote", "docs/standardized.md", "docs/porting.md"} <= sections
