"""Every family of the table, from a tiny random config, passes the full by-value check.

The families table of docs/standardized.md is generated from this file: `python tests/models/test_standardized_families.py`
prints it, and `test_docs_list_the_tested_families` fails when that copy is stale.
"""

import inspect
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import interlace
from interlace.models.standardized.check import check_model
from interlace.models.standardized.families import FAMILIES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import assert_clean  # noqa: E402

PAGE = Path(__file__).resolve().parents[2] / "docs" / "standardized.md"
pytestmark = pytest.mark.usefixtures("one_thread")

# tiny sizes, given to each config class that accepts them (the names differ between families)
SIZES = dict(
    num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=100, max_position_embeddings=64, head_dim=8, num_experts=4, num_local_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
)
OVERRIDES = {
    "codegen": {"rotary_dim": 4},
    "gptj": {"rotary_dim": 4},
    "falcon": {"head_dim": None},  # computed by FalconConfig
    "gpt_neo": {"head_dim": None, "attention_types": [[["global", "local"], 1]]},
}
# what each family lacks, so a part silently going missing fails the test
NO_ATTENTION_INTERFACE = {"bloom", "falcon", "gpt_neo", "mpt", "xglm"}
NO_MLP_MODULE = {"biogpt", "opt", "xglm"}
HEAD_ROWS = ["queries", "keys", "values", "heads_output", "attention_probabilities: sum to 1",
             "attention_probabilities: == eager attention", "attention_probabilities: logits == eager logits",
             "attention_probabilities: write"]


def tiny_family(model_type: str) -> torch.nn.Module:
    config_class = transformers.CONFIG_MAPPING[model_type]
    default = config_class()
    accepted = {k for k in SIZES.keys() | OVERRIDES.get(model_type, {}).keys()
                if k in inspect.signature(config_class.__init__).parameters or hasattr(default, k)}
    sizes = {**SIZES, **OVERRIDES.get(model_type, {})}
    config = config_class(
        **{k: v for k, v in sizes.items() if v is not None and k in accepted},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def expected_missing(model_type: str) -> set[str]:
    missing = set()
    if FAMILIES[model_type].router is None:
        missing.add("routers_output")
    if model_type in NO_MLP_MODULE:
        missing |= {"mlps_input", "mlps_output", "mlps_output[1] = ..."}
    if model_type in NO_ATTENTION_INTERFACE:
        missing |= set(HEAD_ROWS)
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


@pytest.mark.parametrize("model_type", sorted(t for t, f in FAMILIES.items() if f.final_logits))
def test_project_on_vocab_applies_the_final_logit_transform(model_type):
    model = tiny_family(model_type)
    kind, attribute = FAMILIES[model_type].final_logits
    if getattr(model.config, attribute) in (None, 1.0):
        setattr(model.config, attribute, 7.0)  # defaults that do nothing (Gemma 3, Granite): make it matter
    standardized = interlace.StandardizedTransformer(model)
    with standardized.trace([[3, 4, 5]]):
        last = standardized.layers_output[-1].save()
        logits = standardized.logits.save()
    with torch.no_grad():
        untransformed = model.lm_head(standardized.ln_final.module(last))
        projected = standardized.project_on_vocab(last)
    torch.testing.assert_close(projected, logits)
    assert not torch.allclose(untransformed, logits)  # what nnterp's project_on_vocab returns


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
            f"{'no' if model_type in NO_ATTENTION_INTERFACE else 'yes'} | "
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


if __name__ == "__main__":
    print(families_table())
