"""Streaming (`stream=True`, `tracer.stream()`) on a tiny GPT-2: each step's tokens and values equal the
same run without streaming and a hand-written hook; leaving the loop early stops the generation."""

import contextlib
import threading

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import interlace
from helpers import assert_clean, tiny, tiny_tokenizer
from interlace import InterlaceError, LanguageModel, NotSavedError, Proxy

PROMPT = "w5 w6 w7"
NEW = 6


@pytest.fixture(scope="module")
def lm():
    return LanguageModel(tiny("gpt2"), tokenizer=tiny_tokenizer())


def steered(lm, tracer, factor=1.5):
    """Steer layer 1's last position at every step; collect layer 0's last position and the logits."""
    hidden, logits = interlace.list().save(), interlace.list().save()
    with tracer.all():
        lm.transformer.h[1].output[:, -1] *= factor
        hidden.append(lm.transformer.h[0].output[:, -1])
        logits.append(lm.lm_head.output[:, -1])
    return hidden, logits


def steered_generation(lm, **options):
    """A generation of NEW tokens `steered` at every step: (its tracer, hidden, logits, the tokens)."""
    with lm.generate(PROMPT, max_new_tokens=NEW, **options) as tracer:
        hidden, logits = steered(lm, tracer)
        out = lm.generator.output.save()
    return tracer, hidden, logits, out


def test_greedy_steps_equal_the_run_without_streaming_and_a_hand_written_hook(lm):
    _, hidden, logits, out = steered_generation(lm)
    tracer, s_hidden, s_logits, s_out = steered_generation(lm, stream=True)
    steps = []
    for step in tracer.stream():
        assert isinstance(s_hidden, Proxy)  # values bind after the last step
        steps.append((step.index, step.tokens, step.text, step[s_hidden], step[s_logits]))

    # a hand-written hook doing the same on plain generate
    seen = []

    def steer(module, args, output):
        output = output.clone()
        output[:, -1] *= 1.5
        return output

    handles = [lm.module.transformer.h[1].register_forward_hook(steer),
               lm.module.transformer.h[0].register_forward_hook(lambda m, a, o: seen.append(o[:, -1].clone()))]
    try:
        ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])
        reference = lm.module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                       do_sample=False, pad_token_id=0)
    finally:
        for handle in handles:
            handle.remove()

    assert type(s_out) is torch.Tensor and type(s_hidden) is list  # bound after the last step
    assert torch.equal(out, reference) and torch.equal(s_out, out)
    assert [index for index, *_ in steps] == list(range(NEW))
    length = ids.shape[1]
    for index, tokens, text, step_hidden, step_logits in steps:
        assert torch.equal(tokens, out[:, length + index])
        assert text == [" " + lm.tokenizer.decode(tokens)]
        assert len(step_hidden) == 1 and torch.equal(step_hidden[0], hidden[index])
        assert torch.equal(step_hidden[0], seen[index])
        assert torch.equal(step_logits[0], logits[index]) and torch.equal(tokens, logits[index].argmax(-1))
    assert len(s_hidden) == NEW and all(torch.equal(a, b) for a, b in zip(s_hidden, hidden))
    assert_clean(lm.module)


def test_seeded_sampling_two_invokes_steered_every_step_is_bit_identical(lm):
    def run(stream):
        torch.manual_seed(7)
        with lm.generate(max_new_tokens=NEW, do_sample=True, top_k=20, stream=stream) as tracer:
            with tracer.invoke(PROMPT):  # steered: its rows only
                with tracer.all():
                    lm.transformer.h[1].output[:, -1] += 3.0
                    first = lm.transformer.h[0].output[:, -1].save()
            with tracer.invoke(["w1 w2", "w9 w8 w7 w6 w5"]):
                with tracer.all():
                    second = lm.transformer.h[1].output[:, -1].save()
            out = lm.generator.output.save()
        if not stream:
            return out, first, second, None
        steps = [(step.tokens, step.text, step[first], step[second]) for step in tracer.stream()]
        return out, first, second, steps

    out, first, second, _ = run(False)
    s_out, s_first, s_second, steps = run(True)
    assert type(s_first) is torch.Tensor  # bound where the loop was written, though it is a comprehension
    assert torch.equal(s_out, out) and torch.equal(s_first, first) and torch.equal(s_second, second)
    assert len(steps) == NEW
    length = out.shape[1] - NEW
    for index, (tokens, text, step_first, step_second) in enumerate(steps):
        assert tokens.shape == (3,) and torch.equal(tokens, out[:, length + index])
        words = [lm.tokenizer.decode(int(t), skip_special_tokens=True) for t in tokens]
        assert text == [" " + word if word else "" for word in words]  # w0, w1 are special: no text
        assert step_first.shape == (1, 32) and step_second.shape == (2, 32)
    assert torch.equal(steps[-1][2], first)  # `first` binds to the last step's copy, as without streaming
    with lm.generate(max_new_tokens=NEW) as tracer:  # greedy differs: the tokens above were sampled
        with tracer.invoke(PROMPT):
            with tracer.all():
                lm.transformer.h[1].output[:, -1] += 3.0
        with tracer.invoke(["w1 w2", "w9 w8 w7 w6 w5"]):
            pass
        greedy = lm.generator.output.save()
    assert not torch.equal(greedy, out)


def test_a_stop_in_the_middle_ends_the_stream_and_the_values_equal_the_run_without_streaming(lm):
    def run(stream):
        with lm.generate(PROMPT, max_new_tokens=NEW, stream=stream) as tracer:
            with tracer.iter[3]:  # a stop waits for what was recorded before it: here step 3's layer 0
                lm.transformer.h[0].output
                tracer.stop()
            hidden, _ = steered(lm, tracer)
            out = lm.generator.output.save()
        steps = [(step.index, step[hidden]) for step in tracer.stream()] if stream else None
        return hidden, out, steps, tracer

    hidden, out, _, tracer = run(False)
    s_hidden, s_out, steps, s_tracer = run(True)
    assert [index for index, _ in steps] == [0, 1, 2]  # step 3 stopped in its forward: no token
    assert len(s_hidden) == len(hidden) == 3 and all(torch.equal(a, b) for a, b in zip(s_hidden, hidden))
    assert all(torch.equal(items[0], hidden[index]) for index, items in steps)
    assert isinstance(out, Proxy) and isinstance(s_out, Proxy)  # generate never returned
    assert s_tracer.missing == tracer.missing
    assert_clean(lm.module)


class Gate:
    """A pre-hook on the model: counts forwards, and from the third on lets one in per permit (or after 1 s)."""

    def __init__(self, module):
        self.forwards, self.permits = 0, threading.Semaphore(0)
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.forwards += 1
        if self.forwards > 2:
            self.permits.acquire(timeout=1.0)



class Hold(BaseStreamer):
    """A streamer that holds the generation before step 1's forward until `go` is set (or 5 s pass)."""

    def __init__(self):
        self.puts, self.go = 0, threading.Event()

    def put(self, tokens):
        self.puts += 1
        if self.puts == 3:  # (the prompt, step 0's token, then step 1's: step 0 has reached the reader)
            self.go.wait(timeout=5.0)

    def end(self):
        pass


def test_the_readers_own_forwards_while_the_run_goes_on_are_not_the_runs(lm):
    _, hidden, logits, out = steered_generation(lm)
    ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])
    plain = lm.module(ids).logits

    hold = Hold()
    with lm.generate(PROMPT, max_new_tokens=NEW, stream=True, streamer=hold) as tracer:
        s_hidden, s_logits = steered(lm, tracer)
        s_out = lm.generator.output.save()
    mine = []
    for step in tracer.stream():
        if step.index == 0:  # the run's hooks are on the model, waiting for step 1
            mine.append(lm.module(ids).logits)
            hold.go.set()
    # the reader's forward was neither steered nor counted as a step of the run
    assert torch.equal(mine[0], plain)
    assert torch.equal(s_out, out) and len(s_hidden) == len(hidden) == NEW
    assert all(torch.equal(a, b) for a, b in zip(s_hidden + s_logits, hidden + logits))


def read_to_step_one(tracer, leave):
    """The steps read by a loop that leaves after step 1: by `break` (leave None), or by raising `leave`."""
    read = []
    with pytest.raises(leave) if leave else contextlib.nullcontext():
        for step in tracer.stream():
            read.append(step)
            if step.index == 1:
                if leave:
                    raise leave()
                break
    return read


@pytest.mark.parametrize("leave", [None, ValueError, KeyboardInterrupt])
def test_leaving_the_loop_early_stops_the_generation_at_its_next_step_and_leaves_the_model_as_it_was(lm, leave):
    with lm.trace(PROMPT):
        before = lm.output.logits.save()
    gate = Gate(lm.module)
    try:
        with lm.generate(PROMPT, max_new_tokens=20, stream=True) as tracer:
            hidden, _ = steered(lm, tracer)
        read = [step.index for step in read_to_step_one(tracer, leave)]
    finally:
        gate.handle.remove()
    # the loop left after step 1, while step 2's forward waited: the generation ended after step 2's token
    assert read == [0, 1] and gate.forwards == 3
    assert isinstance(hidden, Proxy)  # nothing binds
    with pytest.raises(NotSavedError, match="ended before the last step, which stopped the run: nothing binds"):
        print(hidden)
    assert_clean(lm.module)
    with lm.trace(PROMPT):  # the model is free and unchanged
        after = lm.output.logits.save()
    assert torch.equal(before, after)


def test_a_saved_value_read_before_the_stream_ends_says_when_it_binds(lm):
    with lm.generate(PROMPT, max_new_tokens=2, stream=True) as tracer:
        out = lm.generator.output.save()
    with pytest.raises(NotSavedError, match="bind when the loop over tracer.stream\\(\\) ends, after its last step"):
        out + 1
    steps = tracer.stream()
    next(steps), next(steps)  # the last step given, the loop not ended
    with pytest.raises(NotSavedError, match="bind when the loop over tracer.stream\\(\\) ends"):
        out + 1
    steps = [*steps]
    assert steps == [] and isinstance(out, torch.Tensor) and out.shape[-1] == len(PROMPT.split()) + 2


class Recording(BaseStreamer):
    """A user's Hugging Face streamer: what `generate` hands it."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ends += 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_hugging_face_streamer_keeps_working(lm, stream):
    streamer = Recording()
    with lm.generate(PROMPT, max_new_tokens=4, streamer=streamer, stream=stream) as tracer:
        out = lm.generator.output.save()
    tokens = [step.tokens for step in tracer.stream()] if stream else None
    assert streamer.ends == 1 and len(streamer.puts) == 5
    assert torch.equal(streamer.puts[0], out[:, :3])  # the prompt, then each new token
    assert torch.equal(torch.stack(streamer.puts[1:], 1), out[:, 3:])
    if stream:
        assert all(torch.equal(a, b) for a, b in zip(tokens, streamer.puts[1:]))


@pytest.mark.parametrize("leave", [None, ValueError])
def test_leaving_the_loop_ends_a_hugging_face_streamer_with_the_tokens_the_loop_read(lm, leave):
    streamer = Recording()
    with lm.generate(PROMPT, max_new_tokens=10, streamer=streamer, stream=True) as tracer:
        lm.generator.output.save()
    tokens = [step.tokens for step in read_to_step_one(tracer, leave)]
    # ended, so a reader of it (a TextIteratorStreamer's loop in another thread) does not wait forever
    assert streamer.ends == 1 and len(streamer.puts) == 3
    assert all(torch.equal(a, b) for a, b in zip(streamer.puts[1:], tokens))


def test_a_streamed_trace_is_one_step_with_every_value(lm):
    with lm.trace(PROMPT):
        want = lm.transformer.h[0].output.save()
    with lm.trace(PROMPT, stream=True) as tracer:
        hidden = lm.transformer.h[0].output.save()
        items = interlace.list().save()
        items.append(lm.transformer.h[1].output[:, -1])
    steps = [(step.index, step.tokens, step[hidden], step[items]) for step in tracer.stream()]
    assert len(steps) == 1 and steps[0][:2] == (0, None)
    assert torch.equal(steps[0][2], want) and torch.equal(hidden, want) and len(steps[0][3]) == 1


def test_mistakes_get_clear_errors(lm):
    with lm.generate(PROMPT, max_new_tokens=2) as tracer:
        lm.generator.output.save()
    with pytest.raises(InterlaceError, match="needs a trace started with stream=True"):
        tracer.stream()

    with lm.generate(PROMPT, max_new_tokens=2, stream=True) as tracer:
        first = lm.transformer.h[0].output.save()  # the first forward only
        tokens = lm.generator.output.save()  # the whole run's
    steps = tracer.stream()
    step = next(steps)
    assert step[first].shape == (1, 3, 32)
    later = next(steps)
    with pytest.raises(NotSavedError, match=r"transformer.h.0.output \(.*test_stream.py:\d+: first = lm.transformer"
                                            r".*\) has no value saved in step 1"):  # what and where, not a node number
        later[first]
    with pytest.raises(InterlaceError, match="with a proxy saved in the trace"):
        later["first"]
    with pytest.raises(NotSavedError, match=r"generator.output .* binds after the last step"):
        later[tokens]
    list(steps)
    with pytest.raises(InterlaceError, match="can be read once"):
        next(tracer.stream())

    with pytest.raises(InterlaceError, match="cannot be used inside a session"):
        with lm.session():
            with lm.generate(PROMPT, stream=True):
                pass

    with lm.generate(PROMPT, max_new_tokens=3, stream=True) as tracer:
        with tracer.iter[1]:
            lm.transformer.h[0].output[:, :, 999] = 0  # out of range, at step 1
    steps = tracer.stream()
    assert next(steps).index == 0
    with pytest.raises(interlace.ExecutionError, match="test_stream.py"):
        next(steps)
    assert_clean(lm.module)


def test_seed_samples_the_same_tokens_every_time_and_leaves_the_callers_random_state(lm):
    def run(seed, stream):
        with lm.generate(PROMPT, max_new_tokens=NEW, do_sample=True, seed=seed, stream=stream) as tracer:
            out = lm.generator.output.save()
        tokens = [step.tokens for step in tracer.stream()] if stream else None
        return out, tokens

    state = torch.get_rng_state()
    out, _ = run(3, False)
    s_out, tokens = run(3, True)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(s_out, out) and torch.equal(torch.stack(tokens, 1), out[:, -NEW:])
    assert not torch.equal(run(4, False)[0], out)


def test_a_streamed_weight_is_a_copy_changing_it_leaves_the_model(lm):
    bias = lm.module.transformer.h[0].mlp.c_fc.bias.detach().clone()
    with lm.generate(PROMPT, max_new_tokens=2, stream=True) as tracer:
        weight = lm.transformer.h[0].mlp.c_fc.bias.save()
        lm.transformer.h[0].output.save()  # the first step waits for the forward
    for step in tracer.stream():
        if step.index == 0:
            with torch.no_grad():
                step[weight].add_(1.0)
    assert torch.equal(lm.module.transformer.h[0].mlp.c_fc.bias, bias)


@pytest.mark.parametrize("seed", [None, 5])
def test_random_draws_in_the_readers_loop_neither_change_the_sampled_tokens_nor_are_changed_by_them(lm, seed):
    def run(stream):
        torch.manual_seed(11)
        with lm.generate(PROMPT, max_new_tokens=NEW, do_sample=True, seed=seed, stream=stream) as tracer:
            with tracer.all():
                last = lm.transformer.h[0].output[:, -1]
                last += torch.randn_like(last)  # the run's own draws, every step
            out = lm.generator.output.save()
        drawn = [torch.rand(3) for _ in tracer.stream()] if stream else []
        return out, drawn, torch.rand(2)

    out, _, after = run(False)
    s_out, drawn, s_after = run(True)
    assert torch.equal(s_out, out)
    # the loop's draws are those of torch's generator as the block ended, as if no generation ran beside them
    torch.manual_seed(11)
    assert all(torch.equal(mine, torch.rand(3)) for mine in drawn) and len(drawn) == NEW
    if seed is None:  # the run drew from torch's generator: it is left where the run left it, as without streaming
        assert torch.equal(s_after, after)
    else:  # seed= keeps its draws to itself: the generator is where the loop left it
        assert torch.equal(s_after, torch.rand(2))


def test_sampling_streams_read_one_after_the_other_sample_anew_as_runs_without_streaming(lm):
    def made(stream):
        with lm.generate(PROMPT, max_new_tokens=NEW, do_sample=True, stream=stream) as tracer:
            out = lm.generator.output.save()
        return tracer, out

    torch.manual_seed(2)
    plain = [made(False)[1] for _ in range(2)]
    assert not torch.equal(plain[0], plain[1])
    torch.manual_seed(2)
    streams = [made(True) for _ in range(2)]  # both made before either is read
    for tracer, _ in streams:
        list(tracer.stream())
    assert all(torch.equal(out, want) for (_, out), want in zip(streams, plain))


def test_the_reader_can_trace_the_model_in_its_loop(lm):
    with lm.trace(PROMPT):
        plain = lm.output.logits.save()
    _, hidden, logits, out = steered_generation(lm)
    tracer, s_hidden, s_logits, s_out = steered_generation(lm, stream=True)
    mine = []
    for step in tracer.stream():  # the run waits between steps: the model is the reader's
        with lm.trace(PROMPT):
            mine.append(lm.output.logits.save())
    assert len(mine) == NEW and all(torch.equal(logits, plain) for logits in mine)
    assert torch.equal(s_out, out) and all(torch.equal(a, b) for a, b in zip(s_hidden + s_logits, hidden + logits))
    assert_clean(lm.module)


def test_each_step_carries_what_it_appended_also_values_that_read_no_module_of_the_step(lm):
    with lm.generate(PROMPT, max_new_tokens=NEW, stream=True) as tracer:
        before = lm.transformer.h[0].output[:, -1].sum()  # computed before the loop (step 0's)
        marks, hidden = interlace.list().save(), interlace.list().save()
        with tracer.all() as step:
            marks.append(step)
            marks.append(7)  # a constant
            marks.append(before)
            hidden.append(lm.transformer.h[0].output[:, -1])
    steps = [(step.index, step[marks], step[hidden]) for step in tracer.stream()]
    assert len(marks) == 3 * NEW and len(hidden) == NEW
    for index, step_marks, step_hidden in steps:  # each step's items are its own, in the order appended
        assert step_marks[:2] == [index, 7] and step_marks == marks[3 * index:3 * index + 3]
        assert len(step_hidden) == 1 and torch.equal(step_hidden[0], hidden[index])
    assert torch.equal(marks[2], hidden[0].sum())


def test_a_stream_leaves_no_thread_behind_read_to_its_end_or_never_read(lm):
    def streams():
        return sum(thread.name == "interlace-stream" for thread in threading.enumerate())

    before = streams()
    with lm.generate(PROMPT, max_new_tokens=2, stream=True):
        lm.generator.output.save()
    assert streams() == before  # never read: nothing runs, nothing waits for a reader
    with lm.generate(PROMPT, max_new_tokens=2, stream=True) as tracer:
        out = lm.generator.output.save()
    steps = list(tracer.stream())
    assert len(steps) == 2 and isinstance(out, torch.Tensor) and streams() == before
    with lm.trace(PROMPT):  # the model is free
        lm.output.save()


def test_a_list_that_gains_nothing_in_a_step_gives_that_step_no_items(lm):
    with lm.generate(PROMPT, max_new_tokens=4) as tracer:
        marks = interlace.list().save()
        with tracer.iter[1:3] as step:
            marks.append(step)
    want = marks
    with lm.generate(PROMPT, max_new_tokens=4, stream=True) as tracer:
        marks = interlace.list().save()
        with tracer.iter[1:3] as step:
            marks.append(step)
    per_step = [step[marks] for step in tracer.stream()]
    assert per_step == [[], [want[0]], [want[1]], []] and marks == want == [1, 2]
