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


def test_a_second_key_for_a_name_says_how_to_revoke_one_and_revoke_names_what_it_revoked(tmp_path, capsys):
    """Rotating a key makes a second one for the same name; revoking by that name revokes both."""
    path = str(tmp_path / "keys.db")
    assert cli.main(["keys", "create", "--db", path, "--name", "alice"]) == 0
    first = capsys.readouterr().out.strip()
    assert cli.main(["keys", "create", "--db", path, "--name", "alice"]) == 0
    second, said = capsys.readouterr()
    old = first.split("_")[1]
    assert f"'alice' has other active keys ({old}): `interlace keys revoke --name alice` would revoke all of them; " \
           "revoke one by its id" in said
    assert cli.main(["keys", "revoke", "--db", path, "--name", old]) == 0
    assert capsys.readouterr().out == f"revoked 1 key(s): {old}\n"
    store = KeyStore(path)
    assert store.verify(first) is None and store.verify(second.strip()).name == "alice"
    assert cli.main(["keys", "revoke", "--db", path, "--name", old]) == 1  # nothing left to revoke
    assert capsys.readouterr().out == "revoked 0 key(s)\n"


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
