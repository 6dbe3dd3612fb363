"""StandardizedTransformer on tiny random models: names, accessors, interventions and loading paths.

References are computed another way: hand-written forward hooks, the modules called by hand, a
plain forward. The by-value check of every family is in test_standardized_families.py.
"""

import dataclasses
import re
import warnings

import pytest
import torch
import transformers

import interlace
from interlace import StandardizationError, StandardizedTransformer
from interlace.models.standardized import rename_table
from interlace.models.standardized.attention import PROBES
from interlace.models.standardized.check import check_model

from helpers import FAMILY_SIZES, assert_clean, tiny, tiny_family, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = [[5, 6, 7, 8, 9], [10, 11, 12]]


def hooked_logits(model, hooks, ids=IDS):
    """Logits of a plain forward on the left-padded batch, with hand-written forward hooks."""
    handles = [model.get_submodule(path).register_forward_hook(hook) for path, hook in hooks]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(row)) + row for row in ids])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    try:
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def llama():
    return StandardizedTransformer(tiny("llama"))


def test_standard_names_alias_the_native_modules(llama):
    native = llama.module
    assert llama.layers[1].module is native.model.layers[1]
    assert llama.layers[1].self_attn.module is native.model.layers[1].self_attn
    assert llama.attentions[1].module is native.model.layers[1].self_attn
    assert llama.mlps[0].module is native.model.layers[0].mlp
    assert llama.ln_final.module is native.model.norm and llama.embed_tokens.module is native.model.embed_tokens
    assert llama.model.layers[0].module is native.model.layers[0]  # native paths keep working
    assert (llama.num_layers, llama.hidden_size, llama.num_heads, llama.vocab_size) == (2, 32, 4, 100)


def test_gpt2_names_are_standardized_too():
    gpt2 = StandardizedTransformer(tiny("gpt2"))
    assert gpt2.layers[0].self_attn.module is gpt2.module.transformer.h[0].attn
    assert gpt2.ln_final.module is gpt2.module.transformer.ln_f


def test_queries_are_after_rotary_and_heads_output_feeds_the_output_projection(llama):
    with llama.trace([IDS[0]]):
        normed = llama.attentions_input[0].save()
        queries = llama.queries[0].save()
        keys = llama.keys[0].save()
        heads = llama.heads_output[0].save()
        projection_input = llama.layers[0].self_attn.o_proj.input.save()
    attention = llama.module.model.layers[0].self_attn
    position_ids = torch.arange(5)[None]
    cos, sin = llama.module.model.rotary_emb(normed, position_ids)
    q = attention.q_proj(normed).view(1, 5, 4, 8).transpose(1, 2)
    k = attention.k_proj(normed).view(1, 5, 2, 8).transpose(1, 2)
    q, k = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(queries, q)
    torch.testing.assert_close(keys, k)
    assert heads.shape == (1, 4, 5, 8)
    torch.testing.assert_close(heads.transpose(1, 2).reshape(1, 5, 32), projection_input)


def test_output_hidden_states_show_the_layer_outputs_written(llama):
    # the second call: transformers' hooks recording the hidden states are on the layers by then
    for _ in range(2):
        with llama.trace(IDS, output_hidden_states=True):
            llama.layers_output[0] = llama.layers_output[0] * 0.5
            written = llama.layers_output[0].save()
            hidden_states = llama.output.hidden_states.save()
        torch.testing.assert_close(hidden_states[1], written)


def test_writing_values_changes_the_attention(llama):
    with llama.trace(IDS):
        llama.values[0] = llama.values[0] * 0
        logits = llama.logits.save()
    probe = f"model.layers.0.self_attn.{PROBES}.values"
    want = hooked_logits(llama.module, [(probe, lambda m, a, out: out * 0)])
    torch.testing.assert_close(logits, want)
    assert_clean(llama.module)


@pytest.mark.parametrize("model_type, dense", [
    ("qwen3_moe", {"mlp_only_layers": [0]}),
    ("qwen2_moe", {"decoder_sparse_step": 2}),  # layers 1, 3, ... are sparse
    ("deepseek_v3", {"first_k_dense_replace": 1, "n_routed_experts": 4, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                     "v_head_dim": 8, "kv_lora_rank": 16, "q_lora_rank": 16, "n_group": 1, "topk_group": 1,
                     "num_key_value_heads": 4}),  # not in the family table: its router is found by search
])
def test_routers_of_a_moe_family_with_dense_layers_are_read_in_the_layers_that_have_one(model_type, dense):
    torch.manual_seed(0)
    config = transformers.CONFIG_MAPPING[model_type](**{**FAMILY_SIZES, "num_hidden_layers": 3, **dense})
    module = transformers.AutoModelForCausalLM.from_config(config).eval()
    sparse = [layer for layer, block in enumerate(module.model.layers) if hasattr(block.mlp, "gate")]
    assert 0 < len(sparse) < 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a family outside the table warns)
        model = StandardizedTransformer(module)
    assert model.available["routers"] is None and model.layers_with("routers") == sparse
    with model.trace(IDS):
        routed = [model.routers_output[layer].save() for layer in sparse]
        call = model.inputs.save()
    seen = []
    handles = [module.model.layers[layer].mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out))
               for layer in sparse]
    try:
        with torch.no_grad():
            module(*call[0], **call[1])
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(routed, seen, rtol=0, atol=0)
    dense_layer = next(layer for layer in range(3) if layer not in sparse)
    with pytest.raises(StandardizationError, match=f"layer {dense_layer} has no router: model.layers.{dense_layer}.mlp."
                                                   "gate is not a module of this model .the layers with one: "):
        with model.trace(IDS):
            model.routers_output[dense_layer].save()
    assert [r.name for r in check_model(model) if r.status == "FAIL"] == []
    assert_clean(module)


def test_attention_probabilities_need_the_flag_and_work_on_a_built_model():
    model = tiny("llama")
    plain = StandardizedTransformer(model)
    with pytest.raises(interlace.StandardizationError, match="enable_attention_probs=True"):
        with plain.trace(IDS):
            plain.attention_probabilities[0].save()
    assert model.config._attn_implementation == "interlace_sdpa"
    probs_model = StandardizedTransformer(model, enable_attention_probs=True)
    assert model.config._attn_implementation == "interlace_probabilities"
    with probs_model.trace(IDS):
        probs = probs_model.attention_probabilities[1].save()
    assert probs.shape == (2, 4, 5, 5)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(4, 5))
    assert torch.all(probs[1, :, 2:, :2] == 0)  # no real token attends to the left padding
    assert_clean(model)


def test_reading_attention_probabilities_leaves_an_attention_that_does_more_than_weigh_the_values_exact():
    # Granite's sliding-window attention adds a learned sink after weighing the values; its probabilities
    # are read without changing the output, and writing them changes it in place (the model is not in the
    # family table, so it warns on load)
    module = tiny_family("granite_swa")
    with torch.no_grad():
        want = module(torch.tensor(IDS[:1])).logits
    with pytest.warns(UserWarning):
        model = StandardizedTransformer(module, enable_attention_probs=True)
    with model.trace(IDS[:1]):
        probs = model.attention_probabilities[0].save()
        logits = model.logits.save()
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-6)
    assert probs.shape[-2:] == (5, 5)
    with model.trace(IDS[:1]):
        model.attention_probabilities[0][:] = 0
        zeroed = model.logits.save()
    assert (zeroed - want).abs().max() > 1e-3


def test_attention_probabilities_print_source_shows_where_they_come_from(capsys):
    model = StandardizedTransformer(tiny("llama"), enable_attention_probs=True)
    model.attention_probabilities.print_source()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"attention_probabilities[0] is read at model.layers.0.self_attn.{PROBES}.probabilities, " \
        "from the call of the attention function in:"
    assert printed[1].startswith("eager_attention_forward  (")
    softmax = next(line for line in printed if "nn.functional.softmax(attn_weights" in line)
    assert softmax.split()[:2] == ["softmax_0,", "to_0"]
    model.queries.print_source(1)
    assert any(line.split()[:1] == ["attention_interface_0"] for line in capsys.readouterr().out.splitlines())
    assert_clean(model.module)  # printing rewrites nothing


def test_families_without_the_attention_interface_say_so():
    bloom = StandardizedTransformer(transformers.BloomForCausalLM(transformers.BloomConfig(
        n_layer=2, hidden_size=32, n_head=4, vocab_size=100)).eval())
    with pytest.raises(interlace.StandardizationError, match="attention interface"):
        with bloom.trace(IDS):
            bloom.queries[0].save()
    assert not bloom.attn_probs_available and bloom.available["attention_probabilities"] is not None


@pytest.mark.parametrize("model_type", ["bloom", "gpt_neo"])
def test_attention_probabilities_of_families_without_the_interface_are_their_own(model_type, capsys):
    # Bloom and GPT-Neo pass their probabilities through a dropout module of their own
    module = tiny_family(model_type)
    model = StandardizedTransformer(module, enable_attention_probs=True)
    assert model.attn_probs_available
    model.attention_probabilities.print_source(1)
    dropout_path = model._paths_of("attention_probabilities")[1]
    assert capsys.readouterr().out.startswith(f"attention_probabilities[1] is the output of {dropout_path}, called in:")
    with model.trace(IDS):
        probs = model.attention_probabilities[1].save()
        call = model.inputs.save()
    with model.trace(IDS):
        model.attention_probabilities[0] = model.attention_probabilities[0] * 0.5
        logits = model.logits.save()
    # the family's own attention weights (its second output with output_attentions=True), on the same batch
    args, kwargs = call
    with torch.no_grad():
        native = module(*args, **kwargs, output_attentions=True).attentions[1]
    torch.testing.assert_close(probs, native)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(4, 5))
    dropout = module.get_submodule(model._paths_of("attention_probabilities")[0])
    handle = dropout.register_forward_hook(lambda m, a, out: out * 0.5)
    try:
        with torch.no_grad():
            want = module(*args, **kwargs).logits
    finally:
        handle.remove()
    torch.testing.assert_close(logits, want)
    with torch.no_grad():
        assert (want - module(*args, **kwargs).logits).abs().max() > 1e-4


def as_transformers_4(model):
    """A transformers 5 Llama made to behave as in transformers 4: each decoder layer returns `(hidden,)`
    and the module after it takes item 0, so the tuple branch is tested whatever transformers is installed."""
    layers = model.model.layers
    for layer in layers:
        layer.register_forward_hook(lambda module, args, output: (output,))
    for following in [*layers[1:], model.model.norm]:
        following.register_forward_pre_hook(
            lambda module, args: (args[0][0], *args[1:]) if isinstance(args[0], tuple) else None)
    return model


@pytest.mark.parametrize("tuples", [False, True], ids=["tensors (transformers 5)", "tuples (transformers 4)"])
def test_layer_outputs_read_and_assign_as_tensors_and_as_tuples(tuples):
    model = tiny("llama")
    if tuples:
        as_transformers_4(model)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    seen = {}

    def add_one(module, args, output):  # the reference: a hand-written hook, on either kind of output
        hidden = output[0] if isinstance(output, tuple) else output
        seen["output"] = hidden.clone()
        return (hidden + 1,) if isinstance(output, tuple) else hidden + 1

    handle = model.model.layers[0].register_forward_hook(add_one)
    with torch.no_grad():
        want = model(ids).logits
    handle.remove()

    standardized = StandardizedTransformer(model)
    assert (standardized.layers[0].path in standardized._tuple_outputs) == tuples
    with standardized.trace(ids.tolist()):
        before = standardized.layers_output[0].clone().save()
        standardized.layers_output[0] = standardized.layers_output[0] + 1
        after = standardized.layers_input[1].save()
        logits = standardized.logits.save()
    torch.testing.assert_close(before, seen["output"])
    torch.testing.assert_close(after, before + 1)
    torch.testing.assert_close(logits, want)


def test_a_slice_of_layer_values_reads_a_list_and_refuses_assignment_saying_how(llama):
    """`model.layers_output[1:]` (as `model.layers[1:]`) is one value per layer, each what a hook on it sees."""
    seen = []
    handles = [layer.register_forward_hook(lambda m, a, o: seen.append(o.clone())) for layer in llama.module.model.layers]
    with torch.no_grad():
        llama.module(torch.tensor([[5, 6, 7]]))
    for handle in handles:
        handle.remove()
    with llama.trace([[5, 6, 7]]):
        outputs = [value.save() for value in llama.layers_output[0:]]
        last = llama.layers_output[-1:]
        assert len(last) == 1 and len(llama.attentions[:1]) == 1
    assert len(outputs) == 2 and all(torch.equal(got, want) for got, want in zip(outputs, seen))
    with pytest.raises(StandardizationError, match=r"assign one layer at a time, `for layer in range\(0, 2\)"):
        with llama.trace([[5, 6, 7]]):
            llama.layers_output[0:2] = torch.zeros(1, 3, 32)


def test_skip_layers_passes_the_residual_through(llama):
    with llama.trace(IDS):
        entering = llama.layers_input[0].save()
        llama.skip_layers(0, 1)
        last = llama.layers_output[1].save()
        logits = llama.logits.save()
    torch.testing.assert_close(last, entering)
    with torch.no_grad():
        torch.testing.assert_close(logits, llama.module.lm_head(llama.module.model.norm(entering)))
    assert_clean(llama.module)


def test_skip_layers_counts_from_the_end_and_refuses_a_reversed_range(llama):
    with llama.trace(IDS):
        entering = llama.layers_input[0].save()
        llama.skip_layers(-2, -1)  # the llama fixture has 2 layers
        last = llama.layers_output[1].save()
    torch.testing.assert_close(last, entering)
    for start, end in [(1, 0), (0, 2)]:
        with pytest.raises(StandardizationError, match=f"skip_layers\\({start}, {end}\\) skips layers start to end"):
            with llama.trace(IDS):
                llama.skip_layers(start, end)
    assert_clean(llama.module)


def test_skip_with_a_saved_value(llama):
    with llama.trace(IDS):
        saved = llama.layers_output[1].save()
    with llama.trace(IDS):
        llama.skip_layers(0, 1, skip_with=saved)
        logits = llama.logits.save()
    with llama.trace(IDS):
        want = llama.logits.save()
    torch.testing.assert_close(logits, want)


@pytest.mark.parametrize(("positions", "rows"), [(None, None), (-1, None), ([1, 3], None), (-1, [1]), ([2, 4], [0, 1]),
                                                 (slice(-3, None), None), (slice(1, 3), slice(1, None))])
def test_steer_equals_a_hook_adding_the_vector(llama, positions, rows):
    torch.manual_seed(3)
    vector = torch.randn(32)
    with llama.trace(IDS):
        llama.steer([1, 0], vector, factor=2.0, token_positions=positions, batch_index=rows)
        logits = llama.logits.save()

    def add(module, args, output):
        output = output.clone()
        r = slice(None) if rows is None else rows if isinstance(rows, slice) else torch.tensor(rows)[:, None]
        p = slice(None) if positions is None else positions if isinstance(positions, slice) else torch.as_tensor(positions)
        output[r, p] += 2.0 * vector
        return output

    want = hooked_logits(llama.module, [("model.layers.0", add), ("model.layers.1", add)])
    torch.testing.assert_close(logits, want)


def test_steer_adds_once_at_a_position_listed_twice(llama):
    torch.manual_seed(3)
    vector = torch.randn(32)
    logits = {}
    for positions in ([2, 2], [2], [2, -3]):  # -3: position 2 again, counted from the end of the padded 5
        with llama.trace(IDS):
            llama.steer(0, vector, token_positions=positions)
            logits[str(positions)] = llama.logits.save()
    with llama.trace(IDS):
        plain = llama.logits.save()
    first, *others = logits.values()
    assert not torch.equal(first, plain)
    for other in others:
        assert torch.equal(other, first)


@pytest.mark.parametrize("positions", [0.5, [[1], [2]], "last", [True, False]])
def test_steer_refuses_positions_it_cannot_index_with(llama, positions):
    with pytest.raises(StandardizationError, match="token_positions must be an int, a list or 1-d tensor of ints, "
                                                   "or a slice"):
        with llama.trace(IDS):
            llama.steer(0, torch.zeros(32), token_positions=positions)


@pytest.mark.parametrize("shape", [(33,), (32, 2), ()])
def test_a_vector_not_as_wide_as_the_residual_stream_is_refused_at_its_line(llama, shape):
    """Its own error would come from a hook or the final norm (`size of tensor a (32) must match ... (33)`)."""
    message = re.escape(f"must have the model's hidden size (32) as its last dimension, as residual-stream values do; "
                        f"got a tensor of shape {list(shape)}")
    with pytest.raises(StandardizationError, match="^steer's steering_vector " + message) as info:
        with llama.trace(IDS):
            llama.steer(0, torch.zeros(shape))  # the steering line
    assert "llama.steer(0, torch.zeros(shape))  # the steering line" in str(info.getrepr())
    with pytest.raises(StandardizationError, match="^project_on_vocab's hidden " + message):
        llama.project_on_vocab(torch.zeros(shape))
    assert_clean(llama.module)
    with llama.trace(IDS):  # the model traces as before
        logits = llama.logits.save()
    torch.testing.assert_close(logits, hooked_logits(llama.module, []))


def test_steer_positions_is_nnterps_deprecated_name_for_token_positions(llama):
    torch.manual_seed(3)
    vector = torch.randn(32)
    with llama.trace(IDS):
        llama.steer(0, vector, token_positions=[1, 3])
        want = llama.logits.save()
    with pytest.warns(DeprecationWarning, match="positions"):
        with llama.trace(IDS):
            llama.steer(layers=0, steering_vector=vector, positions=[1, 3])
            logits = llama.logits.save()
    assert torch.equal(logits, want)
    with pytest.raises(ValueError, match="Cannot specify both"):
        with llama.trace(IDS):
            llama.steer(layers=0, steering_vector=vector, positions=0, token_positions=0)


def test_a_native_name_at_the_wrong_depth_points_to_the_module_and_its_standardized_name(llama):
    with pytest.raises(interlace.ModulePathError) as caught:
        with llama.trace(IDS):
            llama.norm.output.save()  # llama's own name is model.norm; the standardized one ln_final
    assert "has no submodule or attribute 'norm'" in str(caught.value)
    assert "A module called 'norm' is at model.norm, named ln_final here." in str(caught.value)
    with pytest.raises(interlace.ModulePathError) as caught:
        llama.model.layers[0].q_proj
    assert "is at model.layers.0.self_attn.q_proj." in str(caught.value)


def test_a_float32_hidden_state_of_a_bfloat16_model_projects_on_its_vocabulary():
    model = StandardizedTransformer(tiny("llama").to(torch.bfloat16))
    with model.trace(IDS):
        hidden = model.layers_output[1][:, -1].save()
    assert hidden.dtype == torch.bfloat16
    assert torch.equal(model.project_on_vocab(hidden.float()), model.project_on_vocab(hidden))
    assert model.get_topk_closest_tokens(hidden[0].float(), k=3) == model.get_topk_closest_tokens(hidden[0], k=3)


def test_attn_probs_available_follows_the_flag():
    model = tiny("llama")
    assert not StandardizedTransformer(model).attn_probs_available
    assert StandardizedTransformer(model, enable_attention_probs=True).attn_probs_available


def test_next_token_probs_and_inputs(llama):
    with llama.trace(IDS):
        probs = llama.next_token_probs.save()
        ids = llama.input_ids.save()
        mask = llama.attention_mask.save()
        embeddings = llama.token_embeddings.save()
    assert ids.tolist() == [[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]]  # left padded
    assert mask.tolist() == [[1] * 5, [0, 0, 1, 1, 1]]
    torch.testing.assert_close(probs, hooked_logits(llama.module, [])[:, -1].softmax(-1))
    torch.testing.assert_close(embeddings, llama.module.model.embed_tokens(ids))


def test_left_padding_is_enforced():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"
    model = StandardizedTransformer(tiny("llama"), tokenizer=tokenizer)
    assert model.tokenizer.padding_side == "left"
    with pytest.raises(interlace.StandardizationError, match="left"):
        StandardizedTransformer(tiny("llama"), padding_side="right")


def test_get_topk_closest_tokens(llama):
    with llama.trace(IDS):
        hidden = llama.layers_output[1][:, -1].save()
    rows = llama.get_topk_closest_tokens(hidden, k=3)
    with torch.no_grad():
        probs = llama.module.lm_head(llama.module.model.norm(hidden)).softmax(-1)
    for row, p in zip(rows, probs):
        values, ids = p.topk(3)
        assert list(row) == [str(i) for i in ids.tolist()]  # no tokenizer: token ids as keys
        assert list(row.values()) == pytest.approx(values.tolist())
    single = llama.get_topk_closest_tokens(hidden[0], k=3)
    assert list(single) == list(rows[0]) and list(single.values()) == pytest.approx(list(rows[0].values()))


def test_loading_from_a_folder_checks_on_fake_tensors_then_dispatches(tmp_path):
    tiny("llama").save_pretrained(tmp_path)
    model = StandardizedTransformer(str(tmp_path), tokenizer=tiny_tokenizer())  # meta device until used
    assert not model.dispatched
    with model.trace([IDS[0]]):
        queries = model.queries[1].save()
        logits = model.logits.save()
    assert model.dispatched and queries.shape == (1, 4, 5, 8)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(torch.tensor([IDS[0]])).logits)


def test_project_on_vocab_outside_a_trace_uses_the_weights_loaded_on_first_use(tmp_path):
    """A model loaded on first use: its standard names (`ln_final`, `lm_head`) reach the loaded modules, so
    `project_on_vocab` and `get_topk_closest_tokens` on a saved value work after the trace."""
    tiny("llama").save_pretrained(tmp_path)
    model = StandardizedTransformer(str(tmp_path), tokenizer=tiny_tokenizer())
    with model.trace([IDS[0]]):
        last = model.layers_output[1].save()
        logits = model.logits.save()
    assert model.dispatched
    torch.testing.assert_close(model.project_on_vocab(last), logits)
    top = model.get_topk_closest_tokens(last[0, -1], k=2)
    assert list(top.values()) == pytest.approx(logits[0, -1].softmax(-1).topk(2).values.tolist())


def test_edited_copy_keeps_the_standard_names(llama):
    vector = torch.ones(32)
    with llama.edit() as steered:
        llama.steer(0, vector)
    with steered.trace(IDS):
        logits = steered.logits.save()
    want = hooked_logits(llama.module, [("model.layers.0", lambda m, a, out: out + vector)])
    torch.testing.assert_close(logits, want)


def test_generation_runs_through_the_probes(llama):
    with llama.generate([IDS[0]], max_new_tokens=4):
        tokens = llama.generator.output.save()
    with torch.no_grad():
        want = llama.module.generate(torch.tensor([IDS[0]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, want)


def test_rename_table_gives_a_plain_language_model_the_names():
    model = tiny("gpt2")
    lm = interlace.LanguageModel(model, rename=rename_table(interlace.models.standardized.FAMILIES["gpt2"]))
    with lm.trace([IDS[0]]):
        hidden = lm.layers[0].self_attn.output[0].save()
        normed = lm.ln_final.output.save()
    assert hidden.shape == normed.shape == (1, 5, 32)


def test_router_outputs_are_the_chosen_experts_and_assigning_them_reroutes():
    config = transformers.MixtralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=100, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    mixtral = StandardizedTransformer(transformers.MixtralForCausalLM(config).eval())
    with mixtral.trace(IDS):
        logits, weights, experts = (mixtral.routers_output[1][i].save() for i in range(3))
    assert logits.shape == (10, 4) and experts.shape == (10, 2)
    assert torch.equal(experts.sort(-1).values, logits.topk(2).indices.sort(-1).values)
    with mixtral.trace(IDS):
        routed = mixtral.routers_output[1]
        mixtral.routers_output[1] = (routed[0], routed[1], routed[2] * 0)  # every token to expert 0
        rerouted = mixtral.logits.save()
    want = hooked_logits(mixtral.module, [("model.layers.1.mlp.gate", lambda m, a, out: (out[0], out[1], out[2] * 0))])
    torch.testing.assert_close(rerouted, want)
    assert not torch.allclose(rerouted, hooked_logits(mixtral.module, []))


def test_unknown_family_is_found_by_names_with_a_warning_and_rename_config():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.config.model_type = "my_gpt"
    with pytest.warns(UserWarning, match="not in interlace's tested family table"):
        found = StandardizedTransformer(model)
    assert found.family.layers == "transformer.h" and found.family.attention == "attn"
    with pytest.raises(interlace.StandardizationError, match="RenameConfig\\(attn_name=...\\)"):
        StandardizedTransformer(model, rename_config=interlace.RenameConfig(attn_name="missing"))


def test_a_rename_config_changes_only_the_parts_it_names_of_a_known_family():
    model = transformers.BloomForCausalLM(transformers.BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=100))
    plain = StandardizedTransformer(model, enable_attention_probs=True)
    renamed = StandardizedTransformer(model, enable_attention_probs=True,
                                      rename_config=interlace.RenameConfig(ln_final_name="word_embeddings_layernorm"))
    assert renamed.family == dataclasses.replace(plain.family, ln_final="transformer.word_embeddings_layernorm")
    assert renamed.available["attention_probabilities"] is None  # Bloom's own path to them is kept
