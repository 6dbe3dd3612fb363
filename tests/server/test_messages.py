"""What a newcomer runs into, each a clear message: a client hanging up mid-upload (one INFO line in the
server's log), a wrong model id, a key with stray whitespace, a host without http://, `serve` and `keys`
with a missing database, a value read before a non-blocking job finished, the CLI's help."""

import socket
import time

import pytest

from serving import Server
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
