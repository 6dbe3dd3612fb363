"""Run test code in a child process under a memory and time cap, so a bomb can never take the machine down.

A `Worker` is one long-lived process that imports a module of cases once and calls its `prepare()`
(torch, a model, warm caches); each
`worker.run(name, *args)` forks a child from it, caps the child's address space and wall time, calls
`module.<name>(*args)` there and returns its JSON result, or says how the child died. A bomb that
gets past our limits ends as a dead child and a failing test, never as a dead machine.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


class Worker:
    def __init__(self, module: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([_HERE, os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen([sys.executable, __file__, module], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, text=True, bufsize=1)

    def run(self, name: str, *args, memory_mb: int = 1024, seconds: float = 30) -> dict:
        """Call `module.<name>(*args)` in a capped child; {"ok": result} or {"died": why}."""
        request = {"name": name, "args": list(args), "memory_mb": memory_mb, "seconds": seconds}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], seconds + 60)
        if not ready:
            self.close()
            raise TimeoutError(f"the capped worker did not answer {name} in time")
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _address_space() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _child(module, request, write_end) -> None:
    import resource

    cap = _address_space() + (request["memory_mb"] << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the default action kills even a loop inside C
    signal.setitimer(signal.ITIMER_REAL, request["seconds"])
    try:
        payload = {"ok": getattr(module, request["name"])(*request["args"])}
    except BaseException as error:  # noqa: BLE001 - reported to the test, which fails on it
        payload = {"died": f"{type(error).__name__}: {error}"[:4000]}
    os.write(write_end, json.dumps(payload, default=str).encode())


def _serve(module_name: str) -> None:
    import importlib

    import torch

    torch.set_num_threads(1)  # no thread pools before fork
    answers = os.fdopen(os.dup(1), "w")  # the answers' own channel: prints of the cases go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    module = importlib.import_module(module_name)
    if hasattr(module, "prepare"):  # build shared state once; every child inherits it
        module.prepare()
    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                _child(module, request, write_end)
            finally:
                os._exit(0)
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 1 << 16):
            chunks.append(chunk)
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        if chunks:
            print(b"".join(chunks).decode(), file=answers, flush=True)
        else:
            why = f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {status}"
            print(json.dumps({"died": f"the child process died ({why}): over its memory or time cap"}),
                  file=answers, flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1])
