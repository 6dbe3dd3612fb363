"""The `interlace` command line: what `serve` sets up before it loads a model."""

import os

import pytest

from interlace import cli
from interlace.server.keys import KeyStore


@pytest.fixture
def db(tmp_path) -> str:
    """A key database with one key (serve refuses a missing one)."""
    path = str(tmp_path / "keys.db")
    KeyStore(path).create("alice")
    return path


class _Started(Exception):
    """Raised in place of starting uvicorn: the test has seen what it needs."""


@pytest.mark.parametrize("flags, offline", [((), "1"), (("--hub",), None)])
def test_serve_keeps_the_hub_offline_unless_told(monkeypatch, db, flags, offline):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = {}

    def load_model(*args, **kwargs):  # what the model loader (and every job after it) would see
        seen["offline"] = os.environ.get("HF_HUB_OFFLINE")
        raise _Started

    monkeypatch.setattr("interlace.server.hosting.load_model", load_model)
    with pytest.raises(_Started):
        cli.main(["serve", "some/model", "--db", db, *flags])
    assert seen["offline"] == offline


def test_serve_refuses_a_limit_that_is_not_a_number(db, capsys):
    assert cli.main(["serve", "some/model", "--db", db, "--max-seconds", "nan"]) == 2
    assert "limit max_seconds must be a positive finite number, not nan" in capsys.readouterr().err
