"""nnterp's getters, ModuleAccessor and renaming helpers, called as nnterp's own tests call them,
compared with hooks on the native modules."""

import pytest
import torch

import interlace
from interlace import LanguageModel, StandardizedTransformer
from interlace.methods import (
    ModuleAccessor,
    RenameConfig,
    collect_last_token_activations_session,
    collect_token_activations_batched,
    compute_next_token_probs,
    get_attention,
    get_attention_output,
    get_ignores,
    get_layer,
    get_layer_input,
    get_layer_output,
    get_logits,
    get_mlp_output,
    get_next_token_probs,
    get_num_layers,
    get_rename_dict,
    get_token_activations,
    get_unembed_norm,
    get_vocab_size,
    project_on_vocab,
    set_layer_output,
)

from helpers import assert_clean, tiny, tiny_family, tiny_tokenizer

PROMPTS = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13"]


def hooked(model, paths, ids, change=None):
    """Each module's output (first item of a tuple) in a plain forward; `change`: {path: fn(output, seen)}."""
    seen, handles = {}, []
    for path in set(paths) | set(change or {}):
        def hook(module, args, output, path=path):
            value = output[0] if isinstance(output, tuple) else output
            seen[path] = value.detach().clone()
            if change and path in change:
                new = change[path](value, seen)
                return (new, *output[1:]) if isinstance(output, tuple) else new
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return seen, logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_getters_on_a_plain_language_model_with_nnterp_renames(family):
    # nnterp's test_basic_utils on a raw LanguageModel
    module = tiny(family)
    lm = LanguageModel(module, tokenizer=tiny_tokenizer(), rename=get_rename_dict())
    assert get_num_layers(lm) == 2
    with lm.trace("w5 w6 w7"):
        attn_output = get_attention_output(lm, 0).save()
        mlp_output = get_mlp_output(lm, 0).save()
        layer_output = get_layer_output(lm, 0).save()
        set_layer_output(lm, 1, layer_output)  # layer 1 passes layer 0's output on
        logits = get_logits(lm).save()
        probs = get_next_token_probs(lm).save()
        projected = project_on_vocab(lm, layer_output).save()
    layer = "model.layers.0" if family == "llama" else "transformer.h.0"
    attention, mlp = f"{layer}.self_attn" if family == "llama" else f"{layer}.attn", f"{layer}.mlp"
    norm = "model.norm" if family == "llama" else "transformer.ln_f"
    second = layer[:-1] + "1"
    ids = torch.tensor([[5, 6, 7]])
    seen, expected = hooked(module, [layer, attention, mlp], ids, change={second: lambda out, seen: seen[layer]})
    assert torch.equal(attn_output, seen[attention]) and torch.equal(mlp_output, seen[mlp])
    assert torch.equal(layer_output, seen[layer]) and torch.equal(logits, expected)
    with torch.no_grad():
        assert torch.equal(projected, module.lm_head(module.get_submodule(norm)(seen[layer])))
    assert torch.equal(probs, expected[:, -1].softmax(-1))
    assert get_vocab_size(lm) == 100 and probs.shape == (1, get_vocab_size(lm))
    assert get_unembed_norm(lm).path == norm and get_attention(lm, 1).path == second + attention[len(layer):]
    assert lm.model.layers[1].path == second and lm.model.ln_final.path == norm  # nnterp's tree under model.model
    assert_clean(module)


def test_layer_input_getter_equals_a_pre_hook():
    module = tiny("llama")
    lm = LanguageModel(module, tokenizer=tiny_tokenizer())
    with lm.trace("w5 w6 w7"):
        layer_input = get_layer_input(lm, 1).save()
    seen, _ = hooked(module, ["model.layers.0"], torch.tensor([[5, 6, 7]]))
    assert torch.equal(layer_input, seen["model.layers.0"])


def test_activation_collection_on_a_plain_language_model():
    # nnterp's test_activation_collection: session, one batch and batches give the same numbers
    module = tiny("llama")
    lm = LanguageModel(module, tokenizer=tiny_tokenizer())
    prompts = PROMPTS * 2
    session = collect_last_token_activations_session(lm, prompts, batch_size=2)
    at_once = get_token_activations(lm, prompts)
    batched = collect_token_activations_batched(lm, prompts, batch_size=1, tqdm=None)
    assert session.shape == (2, len(prompts), 32)
    torch.testing.assert_close(session, at_once)
    torch.testing.assert_close(batched, at_once)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([[int(word[1:]) for word in prompt.split()]])
        seen, _ = hooked(module, ["model.layers.0", "model.layers.1"], ids)
        torch.testing.assert_close(at_once[:, row], torch.stack([seen["model.layers.0"][0, -1], seen["model.layers.1"][0, -1]]))
    probs = compute_next_token_probs(lm, prompts)
    assert probs.shape == (len(prompts), get_vocab_size(lm))


@pytest.mark.parametrize("model_type, layers, norm", [
    ("gpt2", "transformer.h", "transformer.ln_f"), ("bloom", "transformer.h", "transformer.ln_f"),
    ("gptj", "transformer.h", "transformer.ln_f"), ("gpt_neox", "gpt_neox.layers", "gpt_neox.final_layer_norm"),
    ("opt", "model.decoder.layers", "model.decoder.final_layer_norm"), ("llama", "model.layers", "model.norm"),
])
def test_nnterp_tree_under_model_model(model_type, layers, norm):
    # nnterp's test_renaming_forward and test_standardized_transformer_methods: model.model.layers[0]
    module = tiny_family(model_type)
    model = StandardizedTransformer(module)
    assert model.model.layers[0].module is model.layers[0].module is module.get_submodule(layers)[0]
    assert model.model.ln_final.module is model.ln_final.module is module.get_submodule(norm)
    assert model.model.layers[0].self_attn.module is model.attentions[0].module
    with model.trace([[3, 4, 5], [6, 7]]):
        direct = model.model.layers[0].output
        direct = (direct[0] if model._returns_tuple(model.layers[0]) else direct).save()
        accessor = model.layers_output[0].save()
        batch, length = model.input_size[0].save(), model.input_size[1].save()
    seen, _ = hooked(module, [f"{layers}.0"], torch.tensor([[3, 4, 5]]))  # the unpadded row
    assert torch.equal(direct, accessor) and (batch, length) == (2, 3)
    torch.testing.assert_close(accessor[0], seen[f"{layers}.0"][0])


def test_module_accessor_gives_the_modules_under_nnterp_names():
    module = tiny_family("opt")
    accessor = ModuleAccessor(module)
    assert accessor.get_layers() is module.model.decoder.layers
    assert accessor.get_attention(1) is module.model.decoder.layers[1].self_attn
    assert accessor.get_unembed_norm() is module.model.decoder.final_layer_norm
    assert accessor.get_embed_tokens() is module.model.decoder.embed_tokens
    assert accessor.get_unembed() is module.lm_head is accessor.lm_head
    assert accessor.layers is module.model.decoder.layers and accessor.model is module.model
    with pytest.raises(AttributeError, match="Attribute config is not a module"):
        _ = accessor.config
    with pytest.raises(AttributeError):
        _ = accessor.nonexistent_attr
    with pytest.raises(interlace.InterlaceError, match="no MLP module"):
        accessor.get_mlp(0)
    gpt2 = tiny("gpt2")
    custom = ModuleAccessor(gpt2, rename_config=RenameConfig(), rename={"wpe": "positions"})
    assert custom.get_mlp(0) is gpt2.transformer.h[0].mlp and custom.nn_model.model.positions.module is gpt2.transformer.wpe


def test_get_ignores_and_get_vocab_size():
    assert get_ignores(tiny_family("opt")) == ["mlp"]
    assert get_ignores(tiny("llama")) == []
    assert get_ignores(tiny("llama"), RenameConfig(ignore_attn=True)) == ["attention"]
    model = StandardizedTransformer(tiny("gpt2"))
    assert get_ignores(model._model) == [] and get_vocab_size(model) == model.config.vocab_size == 100
    assert get_vocab_size(tiny("llama"), rename_config=RenameConfig(vocab_size_config_key=7)) == 7
    config_less = torch.nn.Linear(2, 2)
    assert get_vocab_size(config_less, raise_error=False) is None
    with pytest.raises(ValueError, match="no vocabulary size"):
        get_vocab_size(config_less)


def test_get_rename_dict_names_nnterp_parts_and_the_config_first():
    renames = get_rename_dict(RenameConfig(attn_name="mixer", layers_name=["stack", "blocks"]))
    assert renames["mixer"] == "self_attn" and renames["stack"] == renames["blocks"] == "layers"
    assert renames["transformer"] == "model" and renames["model.decoder.layers"] == "layers"
    assert renames["ln_f"] == renames["model.ln_final"] == "ln_final" and renames["wte"] == "embed_tokens"
