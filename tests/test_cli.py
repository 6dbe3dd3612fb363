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


def test_serve_warns_when_no_key_is_active_and_refuses_a_missing_database(monkeypatch, tmp_path, capsys):
    path = str(tmp_path / "keys.db")
    store = KeyStore(path)
    store.create("alice")
    store.revoke("alice")

    def load_model(*args, **kwargs):
        raise _Started

    monkeypatch.setattr("interlace.server.hosting.load_model", load_model)
    with pytest.raises(_Started):  # it goes on: a key can be added while it runs
        cli.main(["serve", "some/model", "--db", path])
    said = capsys.readouterr().err
    assert f"the key database {path} has no active key, so every request gets 401" in said
    assert f"interlace keys create --db {path} --name NAME" in said
    missing = str(tmp_path / "typo.db")
    assert cli.main(["serve", "some/model", "--db", missing]) == 2
    assert f"no key database at {missing}" in capsys.readouterr().err and not os.path.exists(missing)
