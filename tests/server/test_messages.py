"""What a newcomer runs into, each a clear message: a client hanging up mid-upload (one INFO line in the
server's log), a wrong model id, a key with stray whitespace, a host without http://, `serve` and `keys`
with a missing database, a value read before a non-blocking job finished, the CLI's help."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from interlace.backends.limits import Limits
import torch

import interlace
import interlace.errors
from interlace import cli
from serving import Server, free_port
from test_bad_input import good


@pytest.fixture(scope="module")
def chatty(setup):
    """A server that logs at INFO."""
    server = Server(setup["folder"], setup["db"], "--log-level", "info")
    yield server
    server.stop()


def test_a_client_hanging_up_mid_upload_is_one_info_line(chatty, setup):
    body = good()
    with socket.create_connection(("127.0.0.1", chatty.port)) as sock:
        sock.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {setup['keys']['alice']}\r\n"
                      f"Content-Length: {len(body) + 100_000}\r\n\r\n").encode() + body)
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while "hung up" not in chatty.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = chatty.output()
    assert [line for line in log.splitlines() if "hung up" in line] == [
        line for line in log.splitlines() if "hung up" in line and " INFO " in line] != []
    assert "Traceback" not in log and " ERROR " not in log


def test_a_wrong_model_id_names_the_hosted_models(chatty, setup):
    with pytest.raises(interlace.errors.ServiceError) as raised:
        interlace.LanguageModel("tiny-gtp2", host=chatty.url, api_key=setup["keys"]["alice"])
    message = str(raised.value)
    assert "hosts no model 'tiny-gtp2'; it hosts 'tiny-gpt2'" in message and "GET /v1/models" in message
    assert "job ids" not in message


def test_a_key_with_stray_whitespace_works_and_one_with_inner_spaces_is_explained(chatty, setup):
    lm = interlace.LanguageModel("tiny-gpt2", host=chatty.url, api_key=f"  {setup['keys']['alice']}\n")
    with lm.trace("w5 w6", remote=True):
        out = lm.transformer.h[0].output.save()
    assert out.shape[:2] == (1, 2)
    with pytest.raises(interlace.InterlaceError, match="exactly as `interlace keys create` printed it"):
        interlace.LanguageModel("tiny-gpt2", host=chatty.url, api_key="il_abc def")


def test_a_host_without_a_scheme_says_so(chatty, setup):
    bare = chatty.url.removeprefix("http://")
    with pytest.raises(interlace.InterlaceError, match=re.escape(f"pass host='http://{bare}'")):
        interlace.LanguageModel("tiny-gpt2", host=bare, api_key=setup["keys"]["alice"])


def test_an_unreachable_server_is_said_once(setup):
    with pytest.raises(interlace.errors.ServiceError) as raised:
        interlace.LanguageModel("tiny-gpt2", host=f"http://127.0.0.1:{free_port()}", api_key=setup["keys"]["alice"])
    assert "cannot reach the interlace server" in str(raised.value) and ".." not in str(raised.value)


def test_serve_refuses_a_missing_key_database(tmp_path, capsys):
    db = str(tmp_path / "kyes.db")
    assert cli.main(["serve", "smollm2", "--db", db]) == 2
    said = capsys.readouterr().err
    assert f"no key database at {db}" in said and f"interlace keys create --db {db} --name NAME" in said
    assert not os.path.exists(db)


def test_keys_list_on_a_wrong_path_creates_nothing(tmp_path, capsys):
    db = str(tmp_path / "kyes.db")
    assert cli.main(["keys", "list", "--db", db]) == 2
    assert not os.path.exists(db) and "no key database at" in capsys.readouterr().err
    assert cli.main(["keys", "revoke", "--db", db, "--name", "x"]) == 2 and not os.path.exists(db)


def test_the_keys_command_does_not_load_torch(tmp_path):
    code = ("import sys; from interlace.cli import main; main(['keys', 'create', '--db', sys.argv[1], '--name', 'a']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "k.db")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("il_") and "created the key database" in done.stderr


def test_the_serve_help_gives_units_and_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "port to listen on (default 8000)" in text
    assert "--max-frame-bytes INT the most bytes of a whole request or result, as received (default 268435456)" in text
    assert "--max-seconds FLOAT the most seconds of wall clock a job may run (checked between operations) " \
        "(default 300.0)" in text
    assert "--flops-per-second FLOAT not a limit but the machine's speed the server assumes" in text
    assert "--log-level {debug,info,warning,error} the least severe messages the server logs (default info)" in text
    for name in Limits.names():  # each limit says what it bounds
        assert f"--{name.replace('_', '-')} {type(getattr(Limits(), name)).__name__.upper()} " \
            f"{' '.join(Limits.described(name).split())} (default" in text


def test_serve_on_a_port_in_use_says_so_before_loading_the_model(setup, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (serve sets it)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert cli.main(["serve", setup["folder"], "--db", setup["db"], "--port", str(port)]) == 2
    said = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in said and "--port" in said and "loading" not in said


def test_serve_of_a_model_that_does_not_exist_says_why_in_one_line(setup, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no-such-model")
    assert cli.main(["serve", missing, "--db", setup["db"], "--port", str(free_port())]) == 1
    said = capfd.readouterr().err
    assert f"interlace serve: cannot load the config of '{missing}'" in said and "Traceback" not in said


def test_a_job_waited_for_on_a_server_that_went_away_says_how_to_fetch_it_later(setup):
    from interlace.backends.remote import RemoteBackend

    gone = RemoteBackend(f"http://127.0.0.1:{free_port()}", setup["keys"]["alice"], model="tiny-gpt2", progress=False)
    with pytest.raises(interlace.errors.ServiceError, match=re.escape("model.job('abc').result()")) as raised:
        gone.job("abc").result()
    assert raised.value.code == "unreachable"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_serve_over_tls_gives_the_local_results_and_clear_errors(setup, local, certificate, monkeypatch):
    cert, key = certificate
    server = Server(setup["folder"], setup["db"], "--ssl-certfile", cert, "--ssl-keyfile", key)
    try:
        assert server.url.startswith("https://")
        with pytest.raises(interlace.errors.ServiceError, match="set SSL_CERT_FILE"):  # self-signed: not trusted
            interlace.LanguageModel("tiny-gpt2", host=server.url, api_key=setup["keys"]["alice"])
        with pytest.raises(interlace.errors.ServiceError, match=re.escape("Does the server take https://?")):
            interlace.LanguageModel("tiny-gpt2", host=server.url.replace("https", "http"),
                                    api_key=setup["keys"]["alice"])
        monkeypatch.setenv("SSL_CERT_FILE", cert)
        remote = interlace.LanguageModel("tiny-gpt2", host=server.url, api_key=setup["keys"]["alice"])
        with remote.trace("w5 w6", remote=True):
            got = remote.transformer.h[1].output.save()
        with local.trace("w5 w6"):
            want = local.transformer.h[1].output.save()
        assert torch.equal(got, want)
    finally:
        server.stop()


def test_serve_refuses_half_a_tls_setup(setup, certificate, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (serve sets it)
    assert cli.main(["serve", setup["folder"], "--db", setup["db"], "--ssl-certfile", certificate[0]]) == 2
    assert "needs both --ssl-certfile and --ssl-keyfile" in capsys.readouterr().err
    assert cli.main(["serve", setup["folder"], "--db", setup["db"], "--ssl-certfile", "nothing.pem",
                     "--ssl-keyfile", certificate[1]]) == 2
    assert "no file at nothing.pem" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--batch-jobs", "--queue-depth", "--jobs-per-key", "--rate", "--result-ttl"])
def test_serve_refuses_a_setting_under_which_no_job_would_run(setup, flag, capsys, monkeypatch):
    """A batch of 0 jobs never ran one (the worker spun, every client waited forever); a queue of 0 refused all."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (serve sets it)
    assert cli.main(["serve", setup["folder"], "--db", setup["db"], flag, "0"]) == 2
    assert f"({flag}) must be at least 1, not 0" in capsys.readouterr().err
