"""Fixtures shared by the tests: small models, and the real SmolLM2 loaded once per session."""

import pytest
import torch

import interlace
from helpers import MLP


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
