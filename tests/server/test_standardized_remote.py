"""StandardizedTransformer remotely: a client builds it from the manifest of `interlace serve --standardized`,
adds the attention probes itself, and every standardized name, per-head value and method gives what the same
model gives here. A server without the probes is a clear error when a per-head value is read."""

import pytest
import torch

import interlace
from interlace import StandardizationError, StandardizedTransformer
from interlace.methods import logit_lens, patchscope_lens
from serving import Server

MODEL = "tiny-gpt2"
PROMPTS = ["w5 w6 w7 w8", "w9 w3"]


@pytest.fixture(scope="module")
def probs_server(setup):
    """Per-head values and attention probabilities (the eager attention)."""
    server = Server(setup["folder"], setup["db"], "--standardized", "--attention-probs", "--check-weights")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def heads_server(setup):
    """Per-head values on the native (sdpa) attention, no probabilities."""
    server = Server(setup["folder"], setup["db"], "--standardized")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local(setup):
    return StandardizedTransformer(setup["folder"], dispatch=True, enable_attention_probs=True)


@pytest.fixture(scope="module")
def remote(probs_server, setup):
    return StandardizedTransformer(MODEL, host=probs_server.url, api_key=setup["keys"]["alice"],
                                   enable_attention_probs=True)


def on_both(local, remote, work):
    """`work(model, remote)` here and on the server."""
    return work(local, False), work(remote, True)


def assert_same(here, there):
    assert len(here) == len(there)
    for a, b in zip(here, there):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()


def test_the_client_builds_the_standardized_model_without_weights(local, remote):
    assert repr(remote) == repr(local)  # the probes included
    assert all(p.is_meta for p in remote.module.parameters())
    assert remote.available == local.available
    assert remote.attentions[1].probes.queries.path == "transformer.h.1.attn.probes.queries"


def test_standardized_names(local, remote):
    def work(model, remote):
        with model.trace(PROMPTS, remote=remote):
            values = [model.layers_output[1].save(), model.layers_input[0].save(),
                      model.attentions_output[0].save(), model.mlps_output[1].save(),
                      model.logits.save(), model.next_token_probs.save()]
        return values

    assert_same(*on_both(local, remote, work))


def test_attention_probabilities(local, remote):
    def work(model, remote):
        with model.trace(PROMPTS, remote=remote):
            probabilities = [model.attention_probabilities[layer].save() for layer in range(model.num_layers)]
        return probabilities

    here, there = on_both(local, remote, work)
    assert_same(here, there)
    for probabilities in there:
        assert probabilities.shape == (2, 4, 4, 4)  # [batch, heads, seq, kv_seq]
        assert torch.allclose(probabilities.sum(-1), torch.ones(2, 4, 4), atol=1e-6)


def test_per_head_values_read_and_written(local, remote):
    def work(model, remote):
        with model.trace(PROMPTS, remote=remote):
            values = [model.queries[0].save(), model.keys[1].save(), model.values[1].save(),
                      model.heads_output[0].save()]
            model.attention_probabilities[1][:, 0] = 0.25  # head 0 attends evenly to the 4 positions
            values.append(model.logits.save())
        return values

    here, there = on_both(local, remote, work)
    assert_same(here, there)
    assert there[0].shape == (2, 4, 4, 8)  # [batch, heads, seq, head_dim]
    with local.trace(PROMPTS):
        unpatched = local.logits.save()
    assert not torch.allclose(there[-1], unpatched)  # the written probabilities changed the output


def test_steer_and_skip_layers(local, remote):
    vector = torch.linspace(-1, 1, 32)

    def work(model, remote):
        with model.trace(PROMPTS, remote=remote):
            model.steer([0, 1], vector, factor=2.0, token_positions=-1)
            steered = model.logits.save()
        with model.trace(PROMPTS, remote=remote):
            model.skip_layers(0, 1)
            skipped = model.logits.save()
        return steered, skipped

    assert_same(*on_both(local, remote, work))


def test_methods(local, remote):
    def work(model, remote):
        return [logit_lens(model, PROMPTS, remote=remote),
                patchscope_lens(model, ["w1 w2 w3", "w4 w5"], layers=[0, 1], remote=remote)]

    assert_same(*on_both(local, remote, work))


def test_the_hosted_model_is_unchanged_by_the_jobs(probs_server, remote):
    with remote.trace(PROMPTS, remote=True):
        remote.attention_probabilities[0][:] = 0.0
        remote.queries[1][:] = 1.0
    health = probs_server.health()
    assert health["checked_jobs"] > 0 and health["model_changes"] == []


def test_interlace_host_from_the_environment(probs_server, setup, local, monkeypatch):
    monkeypatch.setenv("INTERLACE_HOST", probs_server.url)
    monkeypatch.setenv("INTERLACE_API_KEY", setup["keys"]["bob"])
    remote = StandardizedTransformer(MODEL)  # probabilities on by default: the server has them
    assert not remote.dispatched

    def work(model, remote):
        with model.trace(PROMPTS, remote=remote):
            values = [model.queries[1].save(), model.attention_probabilities[0].save()]
        return values

    assert_same(*on_both(local, remote, work))


def test_per_head_values_on_a_server_without_probabilities(heads_server, setup):
    local = StandardizedTransformer(setup["folder"], dispatch=True)
    remote = StandardizedTransformer(MODEL, host=heads_server.url, api_key=setup["keys"]["alice"])

    def work(model, remote):
        with model.trace(PROMPTS, remote=remote):
            values = [model.queries[0].save(), model.heads_output[1].save(), model.layers_output[1].save()]
        return values

    assert_same(*on_both(local, remote, work))
    asking = StandardizedTransformer(MODEL, host=heads_server.url, api_key=setup["keys"]["alice"],
                                     enable_attention_probs=True)
    with pytest.raises(StandardizationError, match="--attention-probs"):
        with asking.trace(PROMPTS, remote=True):
            asking.attention_probabilities[0].save()


def test_a_plain_server_says_which_flag_per_head_values_need(server, setup):
    remote = StandardizedTransformer(MODEL, host=server.url, api_key=setup["keys"]["alice"])
    local = StandardizedTransformer(setup["folder"], dispatch=True)
    with remote.trace(PROMPTS, remote=True):  # the standardized names are native modules: they work
        hidden = remote.layers_output[1].save()
    with local.trace(PROMPTS):
        expected = local.layers_output[1].save()
    assert torch.equal(hidden, expected)
    for name in ("queries", "attention_probabilities"):
        with pytest.raises(StandardizationError, match="interlace serve MODEL --standardized"):
            with remote.trace(PROMPTS, remote=True):
                getattr(remote, name)[0].save()


def test_a_plain_client_of_a_standardized_server(probs_server, setup, local):
    """The manifest lists the native tree: a LanguageModel client builds and checks it as usual, and gets
    what the standardized model computes."""
    remote = interlace.LanguageModel(MODEL, host=probs_server.url, api_key=setup["keys"]["alice"])
    assert repr(remote) == repr(interlace.LanguageModel(setup["folder"]))  # no probes
    with remote.trace(PROMPTS, remote=True):
        logits = remote.output.logits.save()
    with local.trace(PROMPTS):
        expected = local.logits.save()
    assert_same([expected], [logits])
