"""`.source` on a server: the hosted model's own forwards are rewritten when a request names a point,
results equal the local run bit for bit, unknown points are refused before running, and the hosted
model is left as it was (its rewrite aside, which computes exactly what the original does)."""

import copy
import threading

import httpx
import pytest
import torch

import interlace
from hostile import Builder
from interlace.backends.limits import Limits
from interlace.backends.serialize import deserialize_results, serialize_request
from interlace.errors import ModulePathError
from interlace.graph import Request
from interlace.server.hosting import HostedModel
from test_remote import same
from test_source import IDS, attention_path, model_of

PROMPT = "w5 w6 w7 w8"


def points_work(model, remote: bool):
    attention = model.transformer.h[0].attn
    with model.trace(PROMPT, remote=remote):
        qkv = attention.source.c_attn_1.output.save()  # c_attn_0 is the cross-attention branch
        heads = attention.source.attention_interface_0.output[0].save()
        model.transformer.h[1].attn.source.c_proj_0.output[:, -1] = 0  # in place, on the last position
        logits = model.output.logits.save()
    with model.generate(PROMPT, max_new_tokens=3, remote=remote) as tracer:
        steps = interlace.list().save()
        with tracer.all():
            steps.append(model.transformer.h[1].attn.source.split_1.output[0][:, -1])
    return qkv, heads, logits, list(steps)


def test_points_run_remotely_with_the_local_results(server, setup):
    local = interlace.LanguageModel(setup["folder"], dispatch=True)  # not the shared fixtures: rewritten here
    remote = interlace.LanguageModel("tiny-gpt2", host=server.url, api_key=setup["keys"]["bob"])
    here, there = points_work(local, False), points_work(remote, True)
    assert same(here, there)
    with torch.no_grad():
        plain = local.module(**local.tokenizer(PROMPT, return_tensors="pt")).logits
    assert not torch.equal(here[2], plain) and len(here[3]) == 3
    assert server.health()["model_changes"] == []  # checked after every job (--check-weights)


def test_the_manifest_lists_each_module_class_points(server, setup):
    manifest = httpx.get(f"{server.url}/v1/models/tiny-gpt2/manifest", timeout=30,
                         headers={"Authorization": f"Bearer {setup['keys']['bob']}"}).json()
    points = manifest["source"]["GPT2Attention"]
    assert points[:3] == ["isinstance_0", "get_0", "hasattr_0"]
    assert {"c_attn_1", "split_1", "attention_interface_0", "c_proj_0"} <= set(points)
    assert all(not path.endswith("source") and ".source." not in path for path, _ in manifest["modules"])


def test_an_unknown_point_is_refused_before_running_with_the_closest_names(server, setup):
    remote = interlace.LanguageModel("tiny-gpt2", host=server.url, api_key=setup["keys"]["bob"])
    try:
        remote.transformer.h[0].attn.source.c_atn_0
    except ModulePathError as error:
        assert "closest to 'c_atn_0': c_attn_0" in str(error)
    else:
        raise AssertionError("no error")

    g = Builder()  # a graph made elsewhere, naming a point this server's code does not have
    g.save(g.out("transformer.h.0.attn.source.c_attn_7"))
    response = httpx.post(f"{server.url}/v1/jobs", params={"wait": 30}, content=g.bytes([(("w5 w6",), {})]),
                          headers={"Authorization": f"Bearer {setup['keys']['bob']}"}, timeout=60)
    body = response.json()
    assert response.status_code == 422 and body["code"] == "GraphError"
    assert "has no call site 'c_attn_7'; did you mean 'c_attn_1', 'c_attn_0'" in body["message"]


def as_a_server_runs_it(tracer, model: interlace.Model) -> dict:
    """The traced graph run as a server runs a job: from its bytes, checked, untrusted, on `model`."""
    hosted = HostedModel(model, name="hosted", limits=Limits(), check_weights=True)
    data = serialize_request(Request(tracer.graph, [tracer.spec(len(tracer.graph))]))
    answer = hosted.execute_many([hosted.admit(data)], limits=Limits(), cancels=[threading.Event()])[0]
    assert not isinstance(answer, Exception), answer
    assert hosted.changes == []
    return deserialize_results(answer[0], limits=Limits())[0]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma2", "mixtral"])
def test_each_familys_points_give_the_local_results_on_a_server(family):
    model = model_of(family)
    hosted = interlace.Model(copy.deepcopy(model))  # its forwards are rewritten by the request, not here
    net = interlace.Model(model)
    attention = net.get(attention_path(family, 1))
    with net.trace(IDS) as tracer:
        attention.source.attention_interface_0.source.softmax_0.output.save()
        if family == "gpt2":
            attention.source.c_proj_0.output[:, -1] = 0
        else:
            rotated = attention.source.apply_rotary_pos_emb_0.output
            attention.source.apply_rotary_pos_emb_0.output = (rotated[0] * 2, rotated[1])
        net.output.logits.save()
    there = as_a_server_runs_it(tracer, hosted)
    assert there.keys() == tracer.results.keys() and len(there) == 2
    assert all(same(there[index], value) for index, value in tracer.results.items())


def test_smollm2_points_give_the_local_results_on_a_server(smollm2):
    attention = smollm2.model.layers[3].self_attn
    with smollm2.trace("The Eiffel Tower is in the city of") as tracer:
        attention.source.q_proj_0.output.save()
        rotated = attention.source.apply_rotary_pos_emb_0.output
        attention.source.apply_rotary_pos_emb_0.output = (rotated[0] * 0.5, rotated[1])
        smollm2.output.logits[:, -1].save()
    there = as_a_server_runs_it(tracer, smollm2)
    assert there.keys() == tracer.results.keys()
    assert all(same(there[index], value) for index, value in tracer.results.items())
