"""The methods and the full check on the real SmolLM2-135M: actual predictions."""

import pytest
import torch

from interlace.methods import Prompt, get_first_tokens, logit_lens, run_prompts
from interlace.models.standardized.check import check_model

from helpers import assert_clean

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The capital of France is"


def test_the_full_check_passes_on_the_real_model(smollm2_standardized):
    rows = check_model(smollm2_standardized)
    assert [r.name for r in rows if r.status == "FAIL"] == []
    assert {r.name for r in rows if r.status == "n/a"} == {"routers_output"}
    assert_clean(smollm2_standardized.module)


def test_logit_lens_ends_on_paris(smollm2_standardized):
    model = smollm2_standardized
    probs = logit_lens(model, [PROMPT, "The Eiffel Tower is in the city of"])
    assert probs.shape == (2, 30, 49152)
    assert [model.tokenizer.decode(i) for i in probs[:, -1].argmax(-1)] == [" Paris", " Paris"]
    with model.trace([PROMPT]):
        next_token = model.next_token_probs.save()
    torch.testing.assert_close(probs[0, -1], next_token[0])
    paris = model.tokenizer(" Paris")["input_ids"][0]
    assert probs[0, :10, paris].max() < 0.01 < 0.5 < probs[0, -1, paris]  # the answer appears late


def test_run_prompts_tracks_both_spellings(smollm2_standardized):
    model = smollm2_standardized
    paris = get_first_tokens("Paris", model.tokenizer)
    assert len(paris) == 2 and model.tokenizer.decode(paris[1]) == " Paris"
    prompt = Prompt.from_strings(PROMPT, {"target": "Paris", "traps": ["London", "Madrid"]}, model.tokenizer)
    results = run_prompts(model, [prompt], tqdm=None)
    assert results["target"][0, 0] > 0.5 > results["traps"][0, 0]
