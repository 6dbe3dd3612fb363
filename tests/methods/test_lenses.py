"""The lenses on a tiny random Llama, each against a reference built from hand-written hooks."""

import pytest
import torch

from interlace import StandardizedTransformer
from interlace.errors import InterlaceError
from interlace.methods import (
    TargetPrompt,
    TargetPromptBatch,
    get_next_token_probs,
    it_repeat_prompt,
    logit_lens,
    patch_object_attn_lens,
    patchscope_generate,
    patchscope_lens,
    repeat_prompt,
    steer,
)

from helpers import assert_clean, tiny, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# (tiny_tokenizer splits words that start with its special tokens "w0" and "w1": none here)
SOURCES = ["w5 w6 w7 w8", "w9 w22"]
TARGETS = ["w23 w24 w25", "w26 w27 w28 w29 w30"]


@pytest.fixture(scope="module")
def model():
    return StandardizedTransformer(tiny("llama"), tokenizer=tiny_tokenizer())


def run(model, prompts, hooks=(), pre_hooks=()):
    """A plain forward of the left-padded prompts with hand-written hooks; returns the logits."""
    batch = model.tokenizer(prompts, padding=True, return_tensors="pt")
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    handles = [model.module.get_submodule(p).register_forward_hook(h) for p, h in hooks]
    handles += [model.module.get_submodule(p).register_forward_pre_hook(h, with_kwargs=True) for p, h in pre_hooks]
    try:
        with torch.no_grad():
            return model.module(**batch).logits
    finally:
        for handle in handles:
            handle.remove()


def last_tokens(model, prompts, part="layers", kind="output"):
    """Each layer's last-token value (output, or attention input), captured by hooks."""
    seen = {}
    if kind == "output":
        hooks = [(f"model.layers.{i}", lambda m, a, out, i=i: seen.__setitem__(i, out[:, -1].clone())) for i in range(2)]
        run(model, prompts, hooks=hooks)
    else:
        pre = [(f"model.layers.{i}.self_attn", lambda m, a, k, i=i: seen.__setitem__(i, k["hidden_states"][:, -1].clone()))
               for i in range(2)]
        run(model, prompts, pre_hooks=pre)
    return [seen[i] for i in range(2)]


def test_logit_lens_projects_every_layer_at_the_last_position(model):
    probs = logit_lens(model, SOURCES)
    hidden = torch.stack(last_tokens(model, SOURCES), dim=1)
    with torch.no_grad():
        want = model.module.lm_head(model.module.model.norm(hidden)).softmax(-1)
    assert probs.shape == (2, 2, 100) and probs.device.type == "cpu"
    torch.testing.assert_close(probs, want)
    torch.testing.assert_close(probs[:, -1], run(model, SOURCES)[:, -1].softmax(-1))
    assert_clean(model.module)


def test_probabilities_of_a_bfloat16_model_are_float32_softmaxes_of_its_logits():
    """A bfloat16 softmax keeps about three digits of each probability: the lens, the next-token
    probabilities and the closest tokens take the softmax of the model's logits in float32."""
    model = StandardizedTransformer(tiny("llama").to(torch.bfloat16), tokenizer=tiny_tokenizer())
    logits = run(model, SOURCES)[:, -1]
    assert logits.dtype == torch.bfloat16
    want = logits.float().softmax(-1)
    probs = logit_lens(model, SOURCES)
    assert probs.dtype == torch.float32 and torch.equal(probs[:, -1], want)
    with model.trace(SOURCES):
        next_probs = model.next_token_probs.save()
        from_getter = get_next_token_probs(model).save()
        last = model.layers_output[1][:, -1].save()
    assert next_probs.dtype == torch.float32 and torch.equal(next_probs, want) and torch.equal(from_getter, want)
    closest = model.get_topk_closest_tokens(last[0], k=3)
    assert list(closest.values()) == want[0].topk(3).values.tolist()
    assert not torch.equal(logits.softmax(-1).float(), want)  # what a bfloat16 softmax would have given


def test_patchscope_lens_equals_a_patching_hook(model):
    targets = TargetPromptBatch.from_prompts(TARGETS, [-1, -2])
    probs = patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=targets, layers=[0, 1])
    sources = last_tokens(model, SOURCES)
    for layer in range(2):

        def patch(module, args, output, layer=layer):
            output = output.clone()
            output[0, -1], output[1, -2] = sources[layer][0], sources[layer][1]
            return output

        want = run(model, TARGETS, hooks=[(f"model.layers.{layer}", patch)])[:, -1].softmax(-1)
        torch.testing.assert_close(probs[:, layer], want)
    assert probs.shape == (2, 2, 100)


def test_patchscope_lens_takes_nnterps_positional_order(model):
    targets = TargetPromptBatch.from_prompts(TARGETS, [-1, -2])
    positional = patchscope_lens(model, SOURCES, targets, [1])  # (model, sources, targets, layers)
    keywords = patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=targets, layers=[1])
    assert torch.equal(positional, keywords) and positional.shape == (2, 1, 100)


def test_patchscope_forms_agree(model):
    latents = torch.stack(last_tokens(model, SOURCES))[[1]]  # layer 1 only: [1, sources, hidden]
    from_latents = patchscope_lens(model, latents=latents, target_patch_prompts=TargetPrompt(TARGETS[0], -1), layers=[1])
    from_sources = patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=TargetPrompt(TARGETS[0], -1),
                                   layer_to_patch=1)
    torch.testing.assert_close(from_latents, from_sources)
    # a position counted from the start of the prompt is that token, whatever the padding
    first = TargetPromptBatch.from_prompts(TARGETS, [0, 0])
    from_end = TargetPromptBatch.from_prompts(TARGETS, [-3, -5])
    torch.testing.assert_close(
        patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=first, layers=[0]),
        patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=from_end, layers=[0]),
    )
    with pytest.raises(ValueError, match="not both"):
        patchscope_lens(model, source_prompts=SOURCES, layers=[0], layer_to_patch=1)


def test_lenses_run_inside_a_session(model):
    # in a session (one request when remote) each trace's values are known only when it ends
    targets = TargetPromptBatch.from_prompts(TARGETS, [-1, -2])
    target = TargetPrompt(TARGETS[1], -1)
    with model.session():
        scope = patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=targets, layers=[0, 1])
        object_lens = patch_object_attn_lens(model, SOURCES[:1], TARGETS[1:], attn_idx_patch=-2, num_patches=1)
        generated = patchscope_generate(model, SOURCES, target, max_length=3, layers=[0, 1])
    for layer in (0, 1):
        alone = patchscope_generate(model, SOURCES, target, max_length=3, layers=[layer])
        assert torch.equal(generated[layer], alone[layer])
    torch.testing.assert_close(scope, patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=targets,
                                                      layers=[0, 1]))
    torch.testing.assert_close(object_lens, patch_object_attn_lens(model, SOURCES[:1], TARGETS[1:], attn_idx_patch=-2,
                                                                   num_patches=1))


def test_the_lenses_that_run_a_trace_per_layer_show_progress_by_layer_but_not_in_a_session(model):
    bars = []

    def bar(items, desc, unit):  # a stand-in for tqdm: what it was handed, and each item it gave
        bars.append((desc, unit, []))
        for item in items:
            bars[-1][2].append(item)
            yield item

    target = TargetPrompt(TARGETS[1], -1)
    scope = patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=target, layers=[1, 0], tqdm=bar)
    generated = patchscope_generate(model, SOURCES, target, max_length=2, layers=[1], tqdm=bar)
    object_lens = patch_object_attn_lens(model, SOURCES[:1], TARGETS[1:], attn_idx_patch=-2, num_patches=1, tqdm=bar)
    assert bars == [("patchscope", "layer", [(0, 1), (1, 0)]), ("patchscope generation", "layer", [(0, 1)]),
                    ("object-attention lens", "layer", [0, 1])]
    # the same numbers without a bar
    torch.testing.assert_close(scope, patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=target,
                                                      layers=[1, 0], tqdm=None))
    assert torch.equal(generated[1], patchscope_generate(model, SOURCES, target, max_length=2, layers=[1], tqdm=None)[1])
    torch.testing.assert_close(object_lens, patch_object_attn_lens(model, SOURCES[:1], TARGETS[1:], attn_idx_patch=-2,
                                                                   num_patches=1, tqdm=None))
    bars.clear()
    with model.session():  # its traces run when it ends: a bar would only count their recording
        patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=target, layers=[1], tqdm=bar)
    assert bars == []


def test_target_prompt_helpers():
    assert repeat_prompt() == TargetPrompt("king king\n1135 1135\nhello hello\n?", -1)
    assert repeat_prompt(["a"], rel="=", sep=";").prompt == "a=a;?"
    batch = TargetPromptBatch.auto(TargetPrompt("x", -2), 3)
    assert batch.prompts == ["x"] * 3 and batch.index_to_patch.tolist() == [-2] * 3 and batch[1] == TargetPrompt("x", -2)
    assert TargetPromptBatch.auto([TargetPrompt("a", 1), TargetPrompt("b", 2)], 2).index_to_patch.tolist() == [1, 2]
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    chat = it_repeat_prompt(tokenizer, words=["w3"])
    assert chat.prompt.startswith("<system>") and chat.prompt.endswith("<assistant>w3 w3\n?") and chat.index_to_patch == -1


def test_a_patch_position_outside_its_target_prompt_is_refused_before_anything_runs(model):
    """Batched with a longer target, a short one's position past its start would be a padding column: the patch
    would write where nothing reads, and its row would come back unpatched without a word."""
    short = "w31 w32"  # two tokens
    calls = []
    handle = model.module.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        for index in (2, -3):
            targets = [TargetPrompt(TARGETS[1], -1), TargetPrompt(short, index)]
            with pytest.raises(InterlaceError, match=f"index_to_patch={index} lies outside prompt 1 \\('w31 w32'\\), "
                                                     "which has 2 token\\(s\\): pass index_to_patch from -2 to 1"):
                patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=targets, layers=[1])
            with pytest.raises(InterlaceError, match=f"index_to_patch={index} lies outside prompt 0"):
                patchscope_generate(model, SOURCES, TargetPrompt(short, index), max_length=2, layers=[1])
            with pytest.raises(InterlaceError, match=f"attn_idx_patch={index} lies outside prompt 1 \\('w31 w32'\\)"):
                patch_object_attn_lens(model, SOURCES[:1], [TARGETS[1], short], attn_idx_patch=index, num_patches=1)
    finally:
        handle.remove()
    assert not calls  # not even the sources' forwards
    # the last position of each prompt, counted from its start, is its last token: the same patch as -1
    first = TargetPromptBatch.from_prompts([TARGETS[1], short], [4, 1])
    last = TargetPromptBatch.from_prompts([TARGETS[1], short], [-1, -1])
    torch.testing.assert_close(patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=first, layers=[1]),
                               patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=last, layers=[1]))


def test_patchscope_generate_starts_with_the_lens_prediction(model):
    target = TargetPrompt(TARGETS[1], -1)
    generated = patchscope_generate(model, SOURCES, target, max_length=3, layers=[1])
    lens = patchscope_lens(model, source_prompts=SOURCES, target_patch_prompts=target, layers=[1])
    assert generated[1].shape == (2, 5 + 3)
    assert generated[1][:, 5].tolist() == lens[:, 0].argmax(-1).tolist()


def test_patch_object_attn_lens_equals_patching_the_attention_input(model):
    probs = patch_object_attn_lens(model, SOURCES[:1], TARGETS[1:], attn_idx_patch=-2, num_patches=1)
    sources = last_tokens(model, SOURCES[:1], kind="attention input")
    for layer in range(2):

        def patch(module, args, kwargs, layer=layer):
            hidden = kwargs["hidden_states"].clone()
            hidden[:, -2] = sources[layer]
            return args, {**kwargs, "hidden_states": hidden}

        want = run(model, TARGETS[1:], pre_hooks=[(f"model.layers.{layer}.self_attn", patch)])[:, -1].softmax(-1)
        torch.testing.assert_close(probs[:, layer], want)


def test_steer_function_is_the_method(model):
    vector = torch.ones(32)
    with model.trace(SOURCES):
        steer(model, [1], vector, factor=0.5, positions=-1)
        by_function = model.logits.save()
    with model.trace(SOURCES):
        model.steer(1, vector, factor=0.5, token_positions=-1)
        by_method = model.logits.save()
    torch.testing.assert_close(by_function, by_method)
    assert not torch.allclose(by_function, run(model, SOURCES))
