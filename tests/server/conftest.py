"""Fixtures of the server tests: a tiny GPT-2 saved to a folder that the server and the tests both
load, a key database, and real server processes (one with roomy limits and weight checks after
every job, one --trusted with tight limits for queue, rate and deadline refusals, one whose model
generates thousands of tokens), each started once per test
session and stopped at its end, also when a test fails."""

import pytest

import interlace
from helpers import tiny, tiny_tokenizer
from interlace.server.keys import KeyStore
from serving import Server

MODEL = "tiny-gpt2"
LONG = "tiny-llama-long"  # positions for generations of thousands of tokens
KEYS = ["alice", "bob", "mallory"] + [f"user{i}" for i in range(10)] + [f"tight{i}" for i in range(9)]


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    folder = root / MODEL
    tiny("gpt2").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    tiny("llama", positions=4096).save_pretrained(root / LONG)
    tiny_tokenizer().save_pretrained(root / LONG)
    store = KeyStore(str(root / "keys.db"))
    keys = {name: store.create(name) for name in KEYS}
    return {"folder": str(folder), "long": str(root / LONG), "db": str(root / "keys.db"), "keys": keys, "store": store}


@pytest.fixture(scope="session")
def server(setup):
    server = Server(setup["folder"], setup["db"], "--check-weights", "--max-frame-bytes", "2000000",
                    "--max-tensor-bytes", "1000000", "--max-header-bytes", "300000", "--max-nodes", "5000",
                    "--max-invokes", "8", "--max-new-tokens", "16", "--max-result-bytes", "200000",
                    "--jobs-per-key", "4", "--queue-depth", "32")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tight(setup):
    server = Server(setup["folder"], setup["db"], "--trusted", "--queue-depth", "1", "--jobs-per-key", "2", "--rate", "8",
                    "--max-seconds", "1.5")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def generating(setup):
    """A tiny Llama that can generate thousands of tokens (seconds of work), one job at a time."""
    server = Server(setup["long"], setup["db"], "--max-new-tokens", "4096", "--batch-jobs", "1")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def local(setup):
    """The same model, loaded here: what every remote result is compared with."""
    return interlace.LanguageModel(setup["folder"], dispatch=True)


@pytest.fixture(scope="session")
def remote(server, setup):
    """The model as a client sees it: built from the server's manifest, no weights."""
    return interlace.LanguageModel(MODEL, host=server.url, api_key=setup["keys"]["alice"])
