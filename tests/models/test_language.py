"""LanguageModel on tiny random models: batching equals running alone, generation, loading."""

import copy
import inspect
import warnings

import pytest
import torch
import transformers

import interlace
from interlace import LanguageModel
from interlace.models.language import _generation_options

from helpers import assert_clean
from helpers import FAMILIES, tiny, tiny_tokenizer

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]


def alone(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_invokes_equal_each_prompt_alone(family, side):
    model = tiny(family)
    lm = LanguageModel(model, padding_side=side)
    with lm.trace() as tracer:
        saved = []
        for ids in PROMPTS:
            with tracer.invoke(ids):
                saved.append(lm.output.logits.save())
    for ids, logits in zip(PROMPTS, saved):
        assert logits.shape == (1, 6, 100)
        real = logits[0, -len(ids):] if side == "left" else logits[0, : len(ids)]
        torch.testing.assert_close(real, alone(model, ids), atol=1e-5, rtol=1e-4)
    assert_clean(model)


def test_input_forms_give_the_same_batch():
    model = tiny("llama")
    lm = LanguageModel(model)
    ids = torch.tensor([[5, 6, 7]])
    forms = [[5, 6, 7], [[5, 6, 7]], ids, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
             transformers.BatchEncoding({"input_ids": ids})]
    for form in forms:
        with lm.trace(form):
            logits = lm.output.logits.save()
        torch.testing.assert_close(logits[0], alone(model, [5, 6, 7]))
    with pytest.raises(interlace.InterlaceError, match="cannot use float"):
        with lm.trace(3.5):
            lm.output.save()
    with pytest.raises(interlace.InterlaceError, match="got an empty list of prompts: pass at least one"):
        with lm.trace([]):
            lm.output.save()
    with pytest.raises(interlace.InterlaceError, match="an invoke takes one input .* got 2"):
        with lm.trace() as tracer:
            with tracer.invoke([5, 6], [7, 8]):
                lm.output.save()
    with pytest.raises(interlace.InterlaceError, match="no tokenizer"):
        with lm.trace("text"):
            lm.output.save()


def test_a_prompt_without_tokens_is_refused_naming_it_and_the_model_runs_on():
    """A text the tokenizer makes nothing of would be a row of padding only: the model runs on it (or fails on an
    empty float tensor, alone) and what it gives that row means nothing."""
    model = tiny("llama")
    lm = LanguageModel(model, tokenizer=tiny_tokenizer())
    ids = torch.tensor([[5, 6]])
    cases = [
        (lambda tracer: None, "", "prompt 0 of invoke 0 has no tokens: '' tokenizes to nothing, and this tokenizer "
                                  "adds no start token. Leave it out, or give it some text"),
        (lambda tracer: None, ["w5 w6", " "], "prompt 1 of invoke 0 has no tokens: ' ' tokenizes to nothing"),
        (lambda tracer: tracer.invoke(""), "w5", "prompt 0 of invoke 1 has no tokens"),
        (lambda tracer: None, {"input_ids": ids, "attention_mask": torch.zeros_like(ids)},
         "prompt 0 of invoke 0 has no tokens: its token ids are empty \\(or its attention mask is all zeros\\)"),
    ]
    for more, prompts, message in cases:
        with pytest.raises(interlace.InterlaceError, match=message):
            with lm.trace(prompts) as tracer:
                invoke = more(tracer)
                if invoke is not None:
                    with invoke:
                        lm.output.logits.save()
                lm.output.logits.save()
        assert_clean(model)
    with pytest.raises(interlace.InterlaceError, match="prompt 0 of invoke 0 has no tokens"):
        with lm.generate("", max_new_tokens=2):
            lm.generator.output.save()
    with lm.trace("w5 w6"):  # the model takes traces as before
        logits = lm.output.logits.save()
    torch.testing.assert_close(logits[0], alone(model, [5, 6]))


def test_an_invoke_without_input_records_lines_for_every_row_as_nnsight_05s_does():
    model = tiny("llama")
    lm = LanguageModel(model)
    with lm.trace() as tracer:
        with tracer.invoke([5, 6, 7]):
            first = lm.model.layers[0].output.save()
        with tracer.invoke([8, 9, 10]):
            pass
        with tracer.invoke():  # no input: every row
            lm.model.layers[0].output[:, -1] = 0
            logits = lm.output.logits.save()
    kept = []

    def zero(module, args, output):
        kept.append(output[:1].clone())
        output[:, -1] = 0

    handle = model.model.layers[0].register_forward_hook(zero)
    with torch.no_grad():
        want = model(torch.tensor([[5, 6, 7], [8, 9, 10]])).logits
    handle.remove()
    assert len(tracer.invokes) == 2 and logits.shape == want.shape
    torch.testing.assert_close(logits, want)
    torch.testing.assert_close(first[:, :-1], kept[0][:, :-1])
    assert torch.equal(first[:, -1], torch.zeros_like(first[:, -1]))  # the first invoke's rows, zeroed too


def test_layer_output_patch_equals_hook():
    model = tiny("llama")
    lm = LanguageModel(model)
    with lm.trace([5, 6, 7, 8]):
        lm.model.layers[0].output[:, -1] = 0
        logits = lm.output.logits.save()

    def zero(module, args, output):
        output[:, -1] = 0

    handle = model.model.layers[0].register_forward_hook(zero)
    want = alone(model, [5, 6, 7, 8])
    handle.remove()
    torch.testing.assert_close(logits[0], want)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_without_interventions_equals_transformers(family):
    model = tiny(family)
    lm = LanguageModel(model)
    with lm.generate([5, 6, 7], max_new_tokens=6):
        tokens = lm.generator.output.save()
    with torch.no_grad():
        want = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, want)


def steering_hook(vector):
    def hook(module, args, output):
        output[:, -1] += vector

    return hook


def test_steering_every_step_equals_hand_written_hook():
    model = tiny("llama")
    lm = LanguageModel(model)
    vector = torch.randn(32) * 3
    with lm.generate([5, 6, 7], max_new_tokens=5) as tracer:
        with tracer.all():
            lm.model.layers[1].output[:, -1] += vector
        tokens = lm.generator.output.save()
    handle = model.model.layers[1].register_forward_hook(steering_hook(vector))
    with torch.no_grad():
        want = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    handle.remove()
    assert torch.equal(tokens, want)
    with torch.no_grad():
        plain = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert not torch.equal(tokens, plain)  # the steering mattered
    assert_clean(model)


def per_step_outputs(model, path: str, ids, steps: int) -> list:
    """The last position of `path`'s output at each generation step, through a plain hook."""
    seen = []
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, o: seen.append(o[:, -1].clone()))
    with torch.no_grad():
        model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, pad_token_id=0)
    handle.remove()
    return seen


def test_a_block_over_steps_reads_the_same_step_of_a_value_from_an_earlier_block():
    """`s` bound in one `tracer.all()` block and read in another is that step's value at each step (not the
    first step's), in one invoke and across invokes; a block over one step gives one value to every step."""
    model = tiny("gpt2")
    lm = LanguageModel(model)
    want = per_step_outputs(model, "transformer.h.1", [5, 6, 7], 4)
    with lm.generate([5, 6, 7], max_new_tokens=4) as tracer:
        copied, once = interlace.list().save(), interlace.list().save()
        with tracer.all():
            state = lm.transformer.h[1].output[:, -1]
        with tracer.iter[0]:
            first = lm.transformer.h[1].output[:, -1]
        with tracer.all():
            copied.append(state * 1)
            once.append(first * 1)
    assert len(copied) == 4 and all(torch.equal(got, step) for got, step in zip(copied, want))
    assert all(torch.equal(got, want[0]) for got in once)
    with lm.generate([5, 6, 7], max_new_tokens=4) as tracer:  # steps 1 and 2 of both blocks
        later = interlace.list().save()
        with tracer.iter[1:3]:
            state = lm.transformer.h[1].output[:, -1]
        with tracer.iter[1:3]:
            later.append(state + 0)
    assert len(later) == 2 and torch.equal(later[0], want[1]) and torch.equal(later[1], want[2])


def test_a_stop_for_a_step_after_a_block_over_later_steps_is_refused_at_its_line_and_the_block_form_stops():
    """A stop waits for every line recorded before it: after `tracer.all()`, a stop in `tracer.iter[2]` could only
    stop once step 3's copy of that block ran (it used to let the whole generation run, then report the values
    after it as stopped). It is refused where it is written, saying what to write; that form stops at step 2."""
    model = tiny("gpt2")
    lm = LanguageModel(model)
    calls = []
    handle = model.transformer.h[1].register_forward_hook(lambda m, a, o: calls.append(o.shape[1]))
    with pytest.raises(interlace.InterlaceError) as refused:
        with lm.generate([5, 6, 7], max_new_tokens=4) as tracer:
            with tracer.all() as step:
                lm.transformer.h[1].output.save()
            with tracer.iter[2]:
                tracer.stop()  # the refused line
    message = str(refused.value)
    assert "for step 2" in message and "steps 0..3" in message and "tracer.cond(step == 2)" in message
    assert any("refused line" in str(entry.statement) for entry in refused.traceback)  # raised at the user's line
    assert calls == []  # nothing ran
    with lm.generate([5, 6, 7], max_new_tokens=4) as tracer:
        steps = interlace.list().save()
        with tracer.all() as step:
            steps.append(step)
            with tracer.cond(step == 2):
                tracer.stop()
    handle.remove()
    assert list(steps) == [0, 1, 2]
    assert calls == [3, 1]  # steps 0 and 1 ran layer 1; step 2 stopped as it began
    assert_clean(model)


@pytest.mark.parametrize("written, chosen", [("tracer.iter[5]", 5), ("tracer.iter[3:9]", slice(3, 9))])
def test_steps_a_generation_does_not_have_are_refused_saying_which_it_has(written, chosen):
    model = tiny("gpt2")
    lm = LanguageModel(model)
    with pytest.raises(interlace.InterlaceError) as refused:
        with lm.generate([5, 6, 7], max_new_tokens=3) as tracer:
            with tracer.iter[chosen]:
                lm.transformer.h[0].output.save()
    assert str(refused.value).startswith(f"{written} selects no step: this generation has 3 (steps 0 to 2")
    assert_clean(model)
    with pytest.raises(interlace.InterlaceError, match="tracer.iter takes a step or a slice of steps, not list"):
        with lm.generate([5, 6, 7], max_new_tokens=3) as tracer:
            with tracer.iter[[0, 2]]:
                pass


def test_patching_one_invoke_into_another_at_every_step_keeps_its_tokens():
    """Copying invoke 1's state into invoke 2 (the same prompt) at every step changes nothing: both
    generate what the prompt generates alone."""
    model = tiny("llama")
    lm = LanguageModel(model)
    with lm.generate(max_new_tokens=5) as tracer:
        with tracer.invoke([5, 6, 7]):
            with tracer.all():
                state = lm.model.layers[0].output[:, -1]
        with tracer.invoke([5, 6, 7]):
            with tracer.all():
                lm.model.layers[0].output[:, -1] = state
            patched = lm.generator.output.save()
    with torch.no_grad():
        want = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(patched, want)


def test_a_block_reading_a_step_that_an_earlier_block_lacks_names_the_line():
    lm = LanguageModel(tiny("gpt2"))
    with pytest.raises(interlace.InterlaceError) as caught:
        with lm.generate([5, 6, 7], max_new_tokens=4) as tracer:
            with tracer.iter[0:2]:
                state = lm.transformer.h[1].output[:, -1]
            with tracer.iter[1:3]:
                lm.transformer.h[0].output[:, -1] += state  # the line named
    message = str(caught.value)
    assert "at step 2" in message and "steps [0, 1]" in message and "+= state  # the line named" in message


def test_looping_over_tracer_iter_says_to_use_with():
    lm = LanguageModel(tiny("gpt2"))
    with pytest.raises(interlace.InterlaceError, match="`with tracer.iter\\[...\\] as step:`"):
        with lm.generate([5, 6, 7], max_new_tokens=2) as tracer:
            for step in tracer.iter[:]:  # nnsight's spelling
                pass


def test_iter_steps_with_step_value_and_recorded_list():
    model = tiny("gpt2")
    lm = LanguageModel(model)
    with lm.generate([5, 6, 7], max_new_tokens=4) as tracer:
        per_step = interlace.list().save()
        steps = interlace.list().save()
        with tracer.iter[1:3] as step:
            per_step.append(lm.transformer.h[1].output[:, -1])
            steps.append(step)
        first = lm.transformer.h[1].output.save()  # default: the first forward
        second = lm.transformer.h[1].next().output.save()
    assert steps == [1, 2]
    assert first.shape == (1, 3, 32) and second.shape == (1, 1, 32)
    assert len(per_step) == 2
    assert torch.equal(per_step[0], second[:, -1])
    # reference: hidden states per step through a plain hook
    seen = []
    handle = model.transformer.h[1].register_forward_hook(lambda m, a, o: seen.append(o[:, -1].clone()))
    with torch.no_grad():
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    handle.remove()
    assert torch.equal(per_step[1], seen[2])


def test_a_value_saved_in_a_block_over_steps_binds_as_its_last_step():
    model = tiny("gpt2")
    lm = LanguageModel(model)
    with lm.generate([5, 6, 7], max_new_tokens=4) as tracer:
        with tracer.all():
            every = lm.transformer.h[1].output[:, -1].save()
        with tracer.iter[1:3]:
            middle = lm.transformer.h[0].output[:, -1].save()
    assert torch.equal(every, per_step_outputs(model, "transformer.h.1", [5, 6, 7], 4)[3])
    assert torch.equal(middle, per_step_outputs(model, "transformer.h.0", [5, 6, 7], 4)[2])
    with torch.no_grad():
        plain = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    with lm.generate([5, 6, 7], max_new_tokens=4, eos_token_id=int(plain[0, 4])) as tracer:  # ends early
        marks = interlace.list().save()
        with tracer.all() as step:
            every = lm.transformer.h[1].output[:, -1].save()
            marks.append(step)  # reads no module: still runs at its step, and not for steps that never come
            last = (step + 0).save()
            number = step.save()  # the step itself, known before its step runs
        tokens = lm.generator.output.save()
    ran = tokens.shape[1] - 3
    assert ran < 4 and torch.equal(every, per_step_outputs(model, "transformer.h.1", [5, 6, 7], 4)[ran - 1])
    assert marks == list(range(ran)) and last == ran - 1 and number == ran - 1
    with lm.generate([5, 6, 7], max_new_tokens=4) as tracer:
        marks = interlace.list().save()
        with tracer.all() as step:
            step.save()  # the name bound by `as` holds it after the run, as any saved value's name
            marks.append(step)
    assert step == 3 and marks == [0, 1, 2, 3]


def test_a_plain_list_appended_to_in_a_block_over_steps_warns_that_it_holds_the_last_step():
    """nnsight 0.5 runs a block's Python at every step; here it is recorded once, so ported code that appends to a
    plain list gets one value. The warning names the list and its line; `interlace.list()` and a plain list
    filled outside any block over steps are left alone."""
    model = tiny("gpt2")
    lm = LanguageModel(model)
    logits = []
    with pytest.warns(interlace.StepsInPlainListWarning) as caught:
        with lm.generate([5, 6, 7], max_new_tokens=3) as tracer:
            with tracer.all():
                logits.append(lm.lm_head.output[:, -1].save())  # one per step, as nnsight 0.5 would have it
    message = str(caught[0].message)
    assert message.startswith("`logits` is a plain list, and a block over several steps appended a value to it (")
    assert "logits.append(lm.lm_head.output[:, -1].save())  # one per step" in message
    assert "so the list holds one value, the last step's" in message and "`logits = interlace.list().save()`" in message
    assert caught[0].filename == __file__  # the user's `with` line
    assert len(logits) == 1 and torch.equal(logits[0], per_step_outputs(model, "lm_head", [5, 6, 7], 3)[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", interlace.StepsInPlainListWarning)
        kept, first = [], []
        with lm.generate([5, 6, 7], max_new_tokens=3) as tracer:
            every = interlace.list().save()
            with tracer.all():
                every.append(lm.lm_head.output[:, -1])
            first.append(lm.lm_head.output[:, -1].save())  # the first step's, outside any block
            kept.append(lm.generator.output.save())
    assert len(every) == 3 and len(first) == 1 and kept[0].shape == (1, 6)


def test_hugging_face_generation_settings_are_the_callers():
    model, tokenizer = tiny("gpt2"), tiny_tokenizer()
    reference, lm = copy.deepcopy(model), LanguageModel(model, tokenizer=tokenizer)
    batch = tokenizer(["w5 w6 w7 w8 w9"], return_tensors="pt")
    config = transformers.GenerationConfig(do_sample=True, top_k=5, max_new_tokens=3, pad_token_id=0)
    with lm.generate("w5 w6 w7 w8 w9", generation_config=config, seed=0) as tracer:  # sampled, 3 tokens
        with tracer.all():
            steps = lm.transformer.h[0].output[:, -1].save()
        tokens = lm.generator.output.save()
    torch.manual_seed(0)
    assert torch.equal(tokens, reference.generate(**batch, generation_config=config)) and tokens.shape == (1, 8)
    assert len(tracer.copies[0][2]) == 3  # tracer.all() over the config's 3 steps
    # beside a generation_config, transformers deprecates other settings: they go into a copy of it
    options = _generation_options({"generation_config": config, "max_new_tokens": 2, "seed": 0}, tokenizer, [0],
                                  streaming=False)
    assert sorted(options) == ["generation_config", "seed"] and options["generation_config"].max_new_tokens == 2
    assert config.max_new_tokens == 3 and options["generation_config"].top_k == 5
    with pytest.raises(interlace.InterlaceError, match="pass max_new_tokens=... instead of max_length"):
        lm.generate("w5 w6", max_length=8)
    with lm.generate(["w5 w6 w7", "w9 w10 w11"], max_new_tokens=3, num_beams=3, num_return_sequences=2):
        beams = lm.generator.output.save()  # one invoke: its rows are all the batch's
    want = reference.generate(**tokenizer(["w5 w6 w7", "w9 w10 w11"], return_tensors="pt"), max_new_tokens=3,
                              num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    assert torch.equal(beams, want)
    for options, said in (({"num_beams": 3}, "put the prompts in one invoke"),
                          ({"num_return_sequences": 2, "do_sample": True}, "put the prompts in one invoke")):
        with pytest.raises(interlace.InterlaceError, match=said):
            with lm.generate(max_new_tokens=3, **options) as tracer:
                with tracer.invoke("w5 w6"):
                    pass
                with tracer.invoke("w7 w8 w9"):
                    pass
    with pytest.raises(interlace.InterlaceError, match="beam search \\(num_beams > 1\\) does not give"):
        with lm.generate("w5 w6", max_new_tokens=3, num_beams=2, stream=True) as tracer:
            pass
        list(tracer.stream())
    assert_clean(model)


def test_generating_prompts_of_different_lengths_padded_on_the_right_is_refused():
    model = tiny("gpt2")
    lm = LanguageModel(model, tokenizer=tiny_tokenizer(), padding_side="right")
    with pytest.raises(interlace.InterlaceError, match="a shorter prompt would continue after its padding"):
        with lm.generate(["w5 w6 w7 w8", "w11 w12"], max_new_tokens=3):
            pass
    with lm.generate(["w5 w6", "w11 w12"], max_new_tokens=3):  # the same lengths: no padding
        tokens = lm.generator.output.save()
    assert tokens.shape == (2, 5)
    assert_clean(model)


def test_streaming_several_sequences_per_prompt_gives_each_row_its_text():
    lm = LanguageModel(tiny("gpt2"), tokenizer=tiny_tokenizer())
    options = {"max_new_tokens": 3, "do_sample": True, "seed": 1, "num_return_sequences": 2}
    with lm.generate(["w5 w6", "w7 w8"], **options):
        plain = lm.generator.output.save()
    with lm.generate(["w5 w6", "w7 w8"], stream=True, **options) as tracer:
        pass
    steps = list(tracer.stream())
    assert [step.tokens.tolist() for step in steps] == plain[:, -3:].T.tolist()
    assert [step.text for step in steps] == [[f" w{t}" for t in step.tokens.tolist()] for step in steps]


def test_generate_called_inside_a_trace_is_refused_not_silently_a_trace_object():
    model = tiny("gpt2")
    lm = LanguageModel(model, tokenizer=tiny_tokenizer())
    with pytest.raises(interlace.InterlaceError, match=r"with model\.generate\(prompt"):
        with lm.trace() as tracer:
            with tracer.invoke("w5 w6 w7"):
                lm.transformer.h[1].output[:, -1] *= 1.5
            lm.generate(max_new_tokens=3)  # nnsight 0.4 code: it returned an unentered trace and generated nothing
    with pytest.raises(interlace.InterlaceError, match="already open"):
        with lm.trace("w5 w6"):
            lm.trace("w7 w8")  # a trace object made inside another, never entered
    with lm.generate("w5 w6 w7", max_new_tokens=3):
        tokens = lm.generator.output.save()
    with torch.no_grad():
        want = model.generate(torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                              max_new_tokens=3, do_sample=False)
    assert torch.equal(tokens, want)
    assert_clean(model)


def test_generate_batched_invokes_and_streamer():
    model = tiny("llama")
    lm = LanguageModel(model)

    class Streamer:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append("end")

    streamer = Streamer()
    with lm.generate(max_new_tokens=3, streamer=streamer) as tracer:
        with tracer.invoke([5, 6, 7]):
            a = lm.generator.output.save()
        with tracer.invoke([8, 9]):
            b = lm.generator.output.save()
    with torch.no_grad():
        want_a = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        want_b = model.generate(torch.tensor([[8, 9]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(a[0, -6:], want_a[0])
    assert torch.equal(b[0, -5:], want_b[0])
    assert streamer.chunks[-1] == "end" and len(streamer.chunks) == 5  # prompt + 3 tokens + end


def test_dispatch_false_builds_on_meta_and_loads_on_first_run(tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    lm = LanguageModel(str(tmp_path))
    assert not lm.dispatched
    assert lm.model.layers[0].self_attn.q_proj.weight.is_meta
    assert "LlamaDecoderLayer" in repr(lm) and lm.config.num_hidden_layers == 2
    with lm.trace("w5 w6 w7"):
        logits = lm.output.logits.save()
    assert lm.dispatched
    torch.testing.assert_close(logits[0], alone(model, [5, 6, 7]))


def test_envoys_taken_before_the_weights_load_reach_the_loaded_modules(tmp_path):
    """Loading the weights (the first run) keeps every envoy and alias: one taken before it (`norm = lm.model.norm`)
    then reads and runs the loaded module, not the meta one it was built on."""
    model = tiny("llama")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    lm = LanguageModel(str(tmp_path), rename={"model.norm": "ln_final"})
    norm, alias, attention = lm.model.norm, lm.ln_final, lm.model.layers[1].self_attn
    with lm.trace("w5 w6 w7"):
        hidden = lm.model.layers[1].output.save()
    assert lm.dispatched
    assert norm is lm.model.norm and alias is norm and attention is lm.model.layers[1].self_attn
    assert not norm.weight.is_meta and attention.module is lm.module.model.layers[1].self_attn
    with torch.no_grad():  # called outside a trace: the loaded module runs
        torch.testing.assert_close(alias(hidden), model.model.norm(hidden))
    lm.module.model.norm = torch.nn.Identity()  # a child of a loaded module replaced: its envoys follow
    assert isinstance(lm.model.norm.module, torch.nn.Identity) and lm.model.norm is not norm


def test_an_edited_copy_made_before_the_weights_load_shares_them_with_its_model(tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    lm = LanguageModel(str(tmp_path))
    with lm.edit() as steered:
        lm.model.layers[0].output[:, -1] += 1.0
    with steered.trace("w5 w6 w7"):  # the copy runs first: it loads the weights, for both
        edited = steered.output.logits.save()
    with lm.trace("w5 w6 w7"):
        plain = lm.output.logits.save()
    assert lm.dispatched and steered.dispatched
    assert all(a is b for a, b in zip(lm.module.parameters(), steered.module.parameters()))
    torch.testing.assert_close(plain[0], alone(model, [5, 6, 7]))
    handle = model.model.layers[0].register_forward_hook(steering_hook(torch.ones(32)))
    try:
        torch.testing.assert_close(edited[0], alone(model, [5, 6, 7]))
    finally:
        handle.remove()


@pytest.mark.parametrize("options", [{"dtype": torch.bfloat16}, {"device_map": "cpu", "dtype": torch.float16}])
def test_loading_options_reach_from_pretrained(tmp_path, options):
    model = tiny("llama")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    lm = LanguageModel(str(tmp_path), **options)
    assert next(lm.module.parameters()).dtype == options["dtype"]  # the meta build already has it
    with lm.trace("w5 w6 w7"):
        hidden = lm.model.layers[0].output.save()
    assert lm.dispatched and hidden.dtype == options["dtype"]
    want = model.to(options["dtype"])(torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(hidden, want)


def test_a_model_with_offloaded_layers_loads_once_and_traces_them(tmp_path, monkeypatch):
    """accelerate keeps an offloaded layer's weights on the meta device and loads them in its forward:
    the model counts as loaded (it was loaded once, not again for every trace), and a hand-made model
    offloaded the same way is traced as it is."""
    import accelerate

    model = tiny("llama")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    lm = LanguageModel(str(tmp_path / "model"), device_map=device_map, offload_folder=str(tmp_path / "offload"),
                       dispatch=True)
    assert lm.model.layers[1].mlp.up_proj.weight.is_meta and lm.dispatched
    loads = []
    monkeypatch.setattr(LanguageModel, "_load_weights", lambda self: loads.append(1))
    seen = []
    handle = model.model.layers[1].register_forward_hook(lambda module, args, output: seen.append(output))
    want = model(torch.tensor([[5, 6, 7]]))
    handle.remove()
    for _ in range(2):
        with lm.trace("w5 w6 w7"):
            hidden = lm.model.layers[1].output.save()
            logits = lm.output.logits.save()
        torch.testing.assert_close(hidden, seen[0])
        torch.testing.assert_close(logits, want.logits)
    assert loads == []

    offloaded = tiny("llama")
    accelerate.cpu_offload(offloaded)
    handed = LanguageModel(offloaded, tokenizer=tiny_tokenizer())
    assert handed.dispatched
    with handed.trace("w5 w6 w7"):
        logits = handed.output.logits.save()
    torch.testing.assert_close(logits, want.logits)
    with torch.device("meta"):
        built = tiny("llama")  # no weights anywhere: it must be loaded (and cannot be, here)
    assert not LanguageModel(built, tokenizer=tiny_tokenizer()).dispatched


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(interlace.InterlaceError, match="cannot load the config"):
        LanguageModel(str(tmp_path / "nothing-here"))


def test_model_id_from_the_local_cache_without_network(tmp_path, monkeypatch):
    snapshot = tmp_path / "models--someone--tiny-llama" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--someone--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-llama" / "refs" / "main").write_text("0123abcd")
    model = tiny("llama")
    model.save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    import socket

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    lm = LanguageModel("someone/tiny-llama", cache_dir=str(tmp_path), dispatch=True)
    with lm.trace("w5 w6 w7"):
        logits = lm.output.logits.save()
    torch.testing.assert_close(logits[0], alone(model, [5, 6, 7]))


def test_keywords_that_are_config_attributes_change_the_config(tmp_path):
    """GPT-2 calls its attn_dropout module only in the reordered, upcast eager attention."""
    model = tiny("gpt2")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    for dispatch in (False, True):
        lm = LanguageModel(str(tmp_path), reorder_and_upcast_attn=True, attn_implementation="eager", dispatch=dispatch)
        assert lm.config.reorder_and_upcast_attn
        with lm.trace("w5 w6 w7"):
            probabilities = lm.transformer.h[0].attn.attn_dropout.input.save()
            attn_input = lm.transformer.h[0].ln_1.output.save()
        assert probabilities.shape == (1, 4, 3, 3)
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(1, 4, 3))
        attention = lm.module.transformer.h[0].attn  # eager attention by hand
        q, k, _ = attention.c_attn(attn_input).split(32, dim=-1)
        q, k = (t.view(1, 3, 4, 8).transpose(1, 2) for t in (q, k))
        scores = (q @ k.transpose(-1, -2)) / 8**0.5 + torch.triu(torch.full((3, 3), float("-inf")), 1)
        torch.testing.assert_close(probabilities, scores.softmax(-1))


def test_trace_keywords_are_interlace_options_or_forward_arguments():
    lm = LanguageModel(tiny("llama"))
    with pytest.raises(interlace.InterlaceError, match="unexpected keyword argument.*'timeout_s'.*LlamaForCausalLM"):
        lm.trace([5, 6], timeout_s=300)
    with pytest.raises(interlace.InterlaceError, match="remote=True needs a server"):
        lm.trace([5, 6], remote=True, timeout=300)
    with pytest.raises(interlace.InterlaceError, match="remote=True needs a server"):
        lm.generate([5, 6], remote=True)
    with lm.trace([5, 6, 7], output_hidden_states=True, logits_to_keep=1):  # the forward's own
        out = lm.output.save()
    assert len(out.hidden_states) == 3 and out.logits.shape == (1, 1, 100)


def test_a_forward_replaced_on_the_instance_is_the_one_whose_keywords_count():
    """What a forward takes is kept per class function; a forward set on the instance (a wrapper's) is asked itself."""
    lm = LanguageModel(tiny("llama"))
    with lm.trace([5, 6], logits_to_keep=1):  # the class's forward takes it (and is now cached)
        pass
    module = lm.module
    module.forward = lambda input_ids=None, attention_mask=None, position_ids=None: module.model(input_ids)
    try:
        with pytest.raises(interlace.InterlaceError, match="unexpected keyword argument.*'logits_to_keep'"):
            lm.trace([5, 6], logits_to_keep=1)
    finally:
        del module.forward
    with lm.trace([5, 6], logits_to_keep=1):
        out = lm.output.save()
    assert out.logits.shape == (1, 1, 100)


def test_output_zero_of_a_layer_warns_once_about_transformers_5():
    interlace.backends.local._warned_paths.clear()
    lm = LanguageModel(tiny("llama"))
    with pytest.warns(interlace.BatchIndexWarning, match=r"model.layers.0.output is a tensor of shape \(2, 3, 32\)") \
            as caught:
        with lm.trace([[5, 6, 7], [8, 9, 10]]):
            row = lm.model.layers[0].output[0].save(); line = inspect.currentframe().f_lineno  # noqa: E702
    assert row.shape == (3, 32)
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)  # the user's line, not interlace's
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per path: no second warning
        with lm.trace([[5, 6, 7], [8, 9, 10]]):
            lm.model.layers[0].output[0].save()
            lm.model.layers[1].self_attn.output[0].save()  # attention returns a tuple: no warning


def test_to_loads_the_weights_first(tmp_path):
    tiny("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    lm = LanguageModel(str(tmp_path))
    assert lm.to("cpu") is lm and lm.dispatched


def test_position_ids_false_pads_as_plain_hugging_face():
    model, tokenizer = tiny("gpt2"), tiny_tokenizer()
    prompts = ["w5 w6 w7 w8", "w9 w10"]
    tokenizer.padding_side = "left"
    with torch.no_grad():
        plain = model(**tokenizer(prompts, return_tensors="pt", padding=True)).logits
        alone = model(**tokenizer(prompts[1], return_tensors="pt")).logits
    hf = LanguageModel(model, tokenizer=tokenizer, position_ids=False)
    with hf.trace(prompts):
        as_hf = hf.output.logits.save()
    ours = LanguageModel(model, tokenizer=tokenizer)
    with ours.trace(prompts):
        as_alone = ours.output.logits.save()
    assert torch.equal(as_hf, plain)
    torch.testing.assert_close(as_alone[1, -2:], alone[0])  # the padded row equals the prompt alone
    assert (as_hf[1, -2:] - alone[0]).abs().max() > 1e-3  # which plain HF does not give


def test_a_tokenizer_passed_in_is_left_as_it_was():
    model, tokenizer = tiny("gpt2"), tiny_tokenizer()
    tokenizer.padding_side = "right"
    prompts = ["w5 w6 w7 w8", "w9 w10"]
    left = LanguageModel(model, tokenizer=tokenizer)  # pads on the left: works on a copy
    right = LanguageModel(model, tokenizer=tokenizer, padding_side="right")  # the tokenizer as it is
    assert tokenizer.padding_side == "right" and right.tokenizer is tokenizer
    assert left.tokenizer is not tokenizer and left.tokenizer.padding_side == "left"
    for lm in (left, right):  # each model's tokenizer pads as its traces do
        with lm.trace(prompts):
            inputs = lm.inputs.save()
        args, kwargs = inputs
        padded = lm.tokenizer(prompts, return_tensors="pt", padding=True)
        assert torch.equal(kwargs["input_ids"], padded["input_ids"])
        assert torch.equal(kwargs["attention_mask"], padded["attention_mask"])


def test_tokenizer_kwargs_reach_the_tokenizer(tmp_path):
    tiny("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model = interlace.StandardizedTransformer(str(tmp_path), tokenizer_kwargs={"model_max_length": 7})
    assert model.tokenizer.model_max_length == 7
    with model.trace("w3 w4 w5"):
        logits = model.logits.save()
    with torch.no_grad():
        expected = model.module(torch.tensor([[3, 4, 5]])).logits
    assert torch.equal(logits, expected)
