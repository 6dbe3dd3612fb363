"""A real `interlace serve` process on 127.0.0.1 for the tests: started, waited for, always stopped."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def program_from(checkout: str | None) -> tuple[str, ...]:
    """`Server`'s `program` running the interlace of another checkout (None: the one this process imports).
    (`-c`: `-m interlace` would find the package of the current folder before the checkout's.)"""
    if checkout is None:
        return ("-m", "interlace")
    return ("-c", f"import sys; sys.path.insert(0, {checkout!r}); from interlace.cli import main; sys.exit(main())")


class Server:
    """`interlace serve MODEL --db DB *flags` on a free port; `stop()` ends it (kill after 15 s).
    `env`: the server's whole environment (default: this process's). `program`: what runs `interlace`
    (a test's script that changes the server before it calls `interlace.cli.main`)."""

    def __init__(self, model: str, db: str, *flags: str, ready_within: float = 180.0, env: dict | None = None,
                 program: tuple[str, ...] = ("-m", "interlace")):
        self.port = free_port()
        # with --ssl-certfile (self-signed): HTTPS, trusting that certificate
        self.verify = ssl.create_default_context(cafile=flags[flags.index("--ssl-certfile") + 1]) \
            if "--ssl-certfile" in flags else True
        self.url = f"{'http' if self.verify is True else 'https'}://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, *program, "serve", model, "--db", db, "--port", str(self.port),
                   "--log-level", "warning", *flags]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_ready(ready_within)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2, verify=self.verify).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server did not answer within {seconds} s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-5000:]

    def health(self) -> dict:
        return httpx.get(f"{self.url}/v1/health", timeout=10, verify=self.verify).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
