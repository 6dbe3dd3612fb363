"""Fixtures shared by the tests: small models, and the real SmolLM2 loaded once per session."""

import pytest
import torch

import interlace
from interlace import collector
from helpers import MLP


@pytest.fixture(autouse=True)
def no_paused_collector():
    """Every trace resumes the garbage collector it paused: a pause left over would keep it off for good."""
    yield
    assert collector._pauses == 0, "a trace left the garbage collector paused"


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model, loaded once per test session."""
    return interlace.LanguageModel.default(dispatch=True)


@pytest.fixture(scope="session")
def smollm2_standardized(smollm2):
    """The same SmolLM2 modules under the standardized names (its probes change no number)."""
    return interlace.StandardizedTransformer(smollm2.module, tokenizer=smollm2.tokenizer)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: small forwards gain nothing from more, and on a shared
    two-core machine the threads of several processes wait on each other (tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
