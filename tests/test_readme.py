"""The README's examples run as written (on the real model, loaded once per session)."""

import re
from pathlib import Path

import torch

import interlace

from helpers import assert_clean

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(smollm2, smollm2_standardized, monkeypatch, capsys):
    monkeypatch.setattr(interlace.LanguageModel, "default", classmethod(lambda cls, **kw: smollm2))
    monkeypatch.setattr(interlace.StandardizedTransformer, "default", classmethod(lambda cls, **kw: smollm2_standardized))
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)
    # what the examples promise
    assert isinstance(scope["hidden"], torch.Tensor) and scope["last"].shape == (1, 576)
    assert scope["tokens"].shape[-1] == scope["lm"].tokenizer("Hello", return_tensors="pt").input_ids.shape[-1] + 5
    assert list(scope["cache"]) == ["model.layers.10", "model.norm"]
    assert type(scope["norms"]) is list and len(scope["norms"]) == 8  # streamed, then bound
    assert torch.equal(scope["step_norm"], scope["norms"][-1]) and scope["generated"].shape[-1] == len(smollm2.tokenizer("The capital of France is").input_ids) + 8
    assert "module_value[model.layers.5]" in capsys.readouterr().out
    assert scope["layer_probs"].shape == (1, 30, 49152) and scope["by_layer"]["target"].shape == (1, 30)
    assert_clean(smollm2.module)
