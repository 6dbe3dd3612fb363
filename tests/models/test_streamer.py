"""Incremental detokenization on SmolLM2's byte-level tokenizer, and a streamed steered generation of the
real model whose text is exactly the decoded tokens of the same run without streaming."""

import copy

import pytest
import torch

TEXTS = ["The café served crème brûlée 🙂🙂 and 世界 for 5€.", "  spaces\tand\nnewlines  ", "naïve Ωmega 👩‍👩‍👧 end"]


@pytest.mark.parametrize("cleans_up", [False, True], ids=["incremental decoder", "decoded windows"])
def test_the_pieces_join_to_the_whole_decoding_and_never_show_half_a_character(smollm2, cleans_up):
    from interlace.models.streamer import Detokenizer

    tokenizer = copy.deepcopy(smollm2.tokenizer)
    tokenizer.clean_up_tokenization_spaces = cleans_up  # (its decode cleans spaces up: the library's decoder does not)
    prompt = tokenizer("Say:")["input_ids"]
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids) or text == TEXTS[1]  # split characters
        detokenizer = Detokenizer(tokenizer, [prompt, []])
        assert (detokenizer.streams is None) == cleans_up
        pieces = [detokenizer.add([i, i]) for i in ids]
        for row in (0, 1):
            assert "".join(p[row] for p in pieces) == tokenizer.decode(ids)
            assert not any("\ufffd" in p[row] for p in pieces)


def test_streamed_steered_text_is_the_decoded_generation(smollm2):
    lm = smollm2
    steer = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def run(stream):
        with lm.generate("The capital of France is", max_new_tokens=8, stream=stream) as tracer:
            with tracer.all():
                lm.model.layers[10].output[:, -1] += 4.0 * steer
            out = lm.generator.output.save()
        text = "".join(step.text[0] for step in tracer.stream()) if stream else None
        return out, text

    out, _ = run(False)
    s_out, text = run(True)
    assert torch.equal(s_out, out)
    prompt = len(lm.tokenizer("The capital of France is")["input_ids"])
    assert text == lm.tokenizer.decode(out[0, prompt:], skip_special_tokens=True)
    with lm.generate("The capital of France is", max_new_tokens=8):
        plain = lm.generator.output.save()
    assert not torch.equal(plain, out)  # the steering changed the text


def test_the_streaming_demo_shows_the_plain_and_the_steered_generation(smollm2_standardized):
    import io

    from interlace import demo

    model = smollm2_standardized
    shown = io.StringIO()
    plain, steered = demo.stream_side_by_side(model, layer=10, max_new_tokens=12, out=shown)
    prompt = len(model.tokenizer(demo.STREAM_PROMPT)["input_ids"])
    vector = demo.love_vector(model, 10)
    with model.generate(demo.STREAM_PROMPT, max_new_tokens=12):
        alone = model.generator.output.save()
    with model.generate(demo.STREAM_PROMPT, max_new_tokens=12) as tracer:
        with tracer.all():
            model.layers_output[10][:, -1] += vector
        steered_alone = model.generator.output.save()
    assert plain == model.tokenizer.decode(alone[0, prompt:], skip_special_tokens=True)
    assert steered == model.tokenizer.decode(steered_alone[0, prompt:], skip_special_tokens=True)
    assert plain != steered
    assert shown.getvalue().count(demo.STREAM_PROMPT) == 2  # not a terminal: drawn once, at the end
