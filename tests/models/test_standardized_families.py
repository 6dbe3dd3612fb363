"""Every family of the table, from a tiny random config, passes the full by-value check.

The families table of docs/standardized.md is generated from this file: `python tests/models/test_standardized_families.py`
prints it, and `test_docs_list_the_tested_families` fails when that copy is stale.
"""

import copy
import functools
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import interlace
from interlace.models.standardized.check import check_model
from interlace.methods import get_attention_output, get_mlp_output
from interlace.models.standardized.families import FAMILIES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import assert_clean, tiny_family  # noqa: E402

PAGE = Path(__file__).resolve().parents[2] / "docs" / "standardized.md"
pytestmark = pytest.mark.usefixtures("one_thread")

# what a family lacks comes from the table (the MLP) and from the installed transformers (the attention
# interface), never from a list: a release that adds support makes the check stricter, not red
HEAD_ROWS = ["queries", "keys", "values", "heads_output", "attention_probabilities: sum to 1",
             "attention_probabilities: == eager attention", "attention_probabilities: logits == eager logits",
             "attention_probabilities: write"]


class _InterfaceCalled(Exception):
    """Raised by the probe implementation: the family's attention called the interface."""


def _interface_probe(module, *args, **kwargs):
    raise _InterfaceCalled


@functools.cache
def calls_attention_interface(model_type: str) -> bool:
    """Whether the installed transformers runs this family's attention through its attention interface.

    Asked of transformers itself: a probe implementation is registered and selected on a fresh tiny
    model, which then runs; the family uses the interface when its attention calls the probe.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("interface_probe", _interface_probe)
    AttentionMaskInterface.register("interface_probe", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    model = tiny_family(model_type)
    try:
        model.set_attn_implementation("interface_probe")
    except (AttributeError, ValueError):  # the class cannot switch: it has no interface to call
        return False
    try:
        with torch.no_grad():
            model(torch.tensor([[3, 4, 5]]))
    except _InterfaceCalled:
        return True
    return False


def expected_missing(model_type: str) -> set[str]:
    missing = set()
    if FAMILIES[model_type].router is None:
        missing.add("routers_output")
    if FAMILIES[model_type].mlp is None:
        missing |= {"mlps_input", "mlps_output", "mlps_output[1] = ..."}
    if not calls_attention_interface(model_type):
        missing |= {row for row in HEAD_ROWS  # (a family whose own module passes them gives probabilities)
                    if FAMILIES[model_type].probabilities is None or not row.startswith("attention_probabilities")}
    return missing


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_passes_the_full_check(model_type):
    model = tiny_family(model_type)
    standardized = interlace.StandardizedTransformer(model)
    rows = check_model(standardized)
    failed = [f"{r.name}: {r.detail}" for r in rows if r.status == "FAIL"]
    assert not failed, failed
    missing = {r.name for r in rows if r.status == "n/a"}
    assert missing == expected_missing(model_type)
    assert_clean(model)


@pytest.mark.parametrize("renamed", [False, True])
@pytest.mark.parametrize("model_type", sorted(t for t, f in FAMILIES.items() if f.final_logits))
def test_project_on_vocab_applies_the_final_logit_transform(model_type, renamed):
    model = tiny_family(model_type)
    kind, attribute = FAMILIES[model_type].final_logits
    if getattr(model.config, attribute) in (None, 1.0):
        setattr(model.config, attribute, 7.0)  # defaults that do nothing (Gemma 3, Granite): make it matter
    # a RenameConfig naming one part of a known family changes that part only: the row's transform stays
    rename = interlace.RenameConfig(attn_name=FAMILIES[model_type].attention) if renamed else None
    standardized = interlace.StandardizedTransformer(model, rename_config=rename)
    assert standardized.family == FAMILIES[model_type]
    with standardized.trace([[3, 4, 5]]):
        last = standardized.layers_output[-1].save()
        logits = standardized.logits.save()
    with torch.no_grad():
        untransformed = model.lm_head(standardized.ln_final.module(last))
        projected = standardized.project_on_vocab(last)
    torch.testing.assert_close(projected, logits)
    assert not torch.allclose(untransformed, logits)  # what nnterp's project_on_vocab returns


RESIDUAL_ADDING = sorted(t for t, f in FAMILIES.items() if f.attention_update or f.mlp_update)


@pytest.mark.parametrize("model_type", RESIDUAL_ADDING + ["gpt2", "llama", "falcon", "gptj"])
def test_attention_and_mlp_outputs_add_up_to_the_residual_update(model_type):
    """Bloom's attention and MLP (and MPT's MLP) return the residual plus their update: the accessors and
    nnterp's getters give the update alone, as on every family whose layer adds them unchanged."""
    model = tiny_family(model_type)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():  # on a copy: transformers leaves hooks that record the hidden states
        hidden = copy.deepcopy(model)(ids, output_hidden_states=True).hidden_states
    plain = interlace.LanguageModel(model)
    with plain.trace(ids.tolist()):
        plain_update = (get_attention_output(plain, 0) + get_mlp_output(plain, 0)).save()
    standardized = interlace.StandardizedTransformer(model)
    with standardized.trace(ids.tolist()):
        update = (standardized.attentions_output[0] + standardized.mlps_output[0]).save()
    torch.testing.assert_close(update, hidden[1] - hidden[0])
    torch.testing.assert_close(plain_update, hidden[1] - hidden[0])
    # a RenameConfig naming the row's own attention and MLP keeps what the row knows of them
    family = FAMILIES[model_type]
    names = interlace.RenameConfig(attn_name=family.attention, mlp_name=family.mlp)
    assert interlace.StandardizedTransformer(model, rename_config=names).family == family
    assert_clean(model)


@pytest.mark.parametrize("model_type", RESIDUAL_ADDING)
def test_assigning_the_update_of_a_residual_adding_mlp(model_type):
    model = tiny_family(model_type)
    standardized = interlace.StandardizedTransformer(model)
    with standardized.trace([[3, 4, 5, 6]]):
        standardized.mlps_output[0] = standardized.mlps_output[0] * 0
        logits = standardized.logits.save()
    # the reference: the MLP module returns its residual argument, the update left out
    mlp = model.get_submodule(f"{standardized.family.layers}.0.{standardized.family.mlp}")
    handle = mlp.register_forward_hook(lambda module, args, output: args[1])
    try:
        with torch.no_grad():
            want = model(torch.tensor([[3, 4, 5, 6]])).logits
    finally:
        handle.remove()
    torch.testing.assert_close(logits, want)


def families_table() -> str:
    """The docs table: one row per tested family and what it has."""
    lines = [
        "| model type | class | layers | attention | MLP | probabilities, q/k/v | router | final logits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model_type in sorted(FAMILIES):
        family = FAMILIES[model_type]
        architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        lines.append(
            f"| {model_type} | {architecture} | `{family.layers}` | `{family.attention}` | "
            f"{'`' + family.mlp + '`' if family.mlp else 'none'} | "
            f"{'yes' if calls_attention_interface(model_type) else 'probabilities' if family.probabilities else 'no'}"
            " | "
            f"{'`' + family.router + '`' if family.router else ''} | "
            f"{'`' + family.final_logits[1] + '`' if family.final_logits else ''} |"
        )
    return "\n".join(lines)


def test_docs_list_the_tested_families():
    assert families_table() in PAGE.read_text(), (
        "the families table of docs/standardized.md is stale: regenerate it with `python tests/models/test_standardized_families.py`"
    )


def test_at_least_25_families():
    assert len(FAMILIES) >= 25


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (transformers.MambaConfig(num_hidden_layers=1, hidden_size=16, vocab_size=50), "state-space"),
        (transformers.T5Config(num_layers=1, d_model=16, d_ff=32, num_heads=2, d_kv=8, vocab_size=50), "encoder-decoder"),
    ],
)
def test_out_of_reach_architectures_get_a_clear_error(config, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModel.from_config(config)
    with pytest.raises(interlace.StandardizationError, match=message):
        interlace.StandardizedTransformer(model)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2", "gpt_neox", "gemma2"])
def test_the_bare_model_without_its_head_is_a_clear_error(model_type):
    """AutoModel where AutoModelForCausalLM was meant: the family is known, but its layers sit one level up and
    there is no head. The error says so, not torch's `get_submodule` deep in the set-up."""
    family = FAMILIES[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bare = transformers.AutoModel.from_config(tiny_family(model_type).config)
    with pytest.raises(interlace.StandardizationError) as info:
        interlace.StandardizedTransformer(bare)
    assert str(info.value).startswith(
        f"{type(bare).__name__} lacks '{family.layers}' (its layers) and '{family.lm_head}' (its head), which a "
        f"'{model_type}' language model has. StandardizedTransformer takes the model with its language-model head "
        "(loaded with AutoModelForCausalLM), not the bare model (AutoModel)")


def test_a_model_without_a_model_type_is_named_so_in_the_warning():
    model = tiny_family("gpt2")
    model.config.model_type = ""
    with pytest.warns(UserWarning, match="^A model whose config names no model_type is not in interlace's tested "
                                         "family table"):
        found = interlace.StandardizedTransformer(model)
    assert found.family.layers == "transformer.h"


if __name__ == "__main__":
    print(families_table())
