"""What running jobs in a worker process (the default of `interlace serve`) buys and costs, against
`--in-process`, side by side in one run.

Run `python benchmarks/isolation.py [--repeats 50] [--size 6144]`. It starts two `interlace serve`
processes on 127.0.0.1 with a tiny GPT-2 (one default, one `--in-process`; both assume a machine far
faster than this one, `--flops-per-second 1e15`, so that one long product slips past the executor's
checks) and prints for each:

1. a small job (save one layer's output): median and 95th percentile of the round trip over loopback;
2. `GET /v1/health` while a long job runs (repeated 1500 x 1500 products, stopped by its deadline):
   median and max of the probes, against idle;
3. one `--size` x `--size` matrix product (one operation, seconds long) under a 1 s deadline: how long
   after its deadline the 504 came.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "server"))
from interlace.server.keys import KeyStore  # noqa: E402
from serving import Server  # noqa: E402
from test_bad_input import good, slow  # noqa: E402
from test_worker import one_long_operation  # noqa: E402


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def _post(server, key, data, **params) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/jobs", params={"wait": 60, **params}, content=data, timeout=120,
                      headers={"Authorization": f"Bearer {key}"})


def _probe(server, seconds: float) -> list[float]:
    times, end = [], time.monotonic() + seconds
    with httpx.Client() as client:
        while time.monotonic() < end:
            began = time.perf_counter()
            client.get(f"{server.url}/v1/health", timeout=30)
            times.append(time.perf_counter() - began)
            time.sleep(0.02)
    return times


def _measure(server, key, args) -> dict:
    found = {}
    data = good()
    for _ in range(5):
        _post(server, key, data)
    small = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        assert _post(server, key, data).status_code == 200
        small.append(time.perf_counter() - began)
    small.sort()
    found["small"] = (statistics.median(small), small[round(0.95 * (len(small) - 1))])
    found["idle"] = _probe(server, 1.0)
    running = threading.Thread(target=_post, args=(server, key, slow(2000)), kwargs={"timeout": 4})
    running.start()
    time.sleep(0.5)
    found["busy"] = _probe(server, 3.0)
    running.join()
    began = time.perf_counter()
    response = _post(server, key, one_long_operation(args.size), timeout=1)
    found["one op"] = (response.status_code, time.perf_counter() - began - 1)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--size", type=int, default=6144, help="side of the one long matrix product")
    args = parser.parse_args()
    from helpers import tiny, tiny_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "tiny-gpt2")
        tiny("gpt2").save_pretrained(source)
        tiny_tokenizer().save_pretrained(source)
        db = os.path.join(folder, "keys.db")
        key = KeyStore(db).create("bench")
        flags = ("--rate", "100000", "--flops-per-second", "1e15")
        results = {}
        for label, extra in (("worker process", ()), ("in process", ("--in-process",))):
            server = Server(source, db, *flags, *extra, ready_within=300)
            try:
                results[label] = _measure(server, key, args)
            finally:
                server.stop()
    print(f"cores: {len(os.sched_getaffinity(0))}; small job: save one layer's output of a tiny GPT-2; "
          f"{args.repeats} repeats")
    print(f"{'':44}{'worker process':>16}{'in process':>16}")
    rows = [("small job round trip, median ms", lambda r: _ms(r["small"][0])),
            ("small job round trip, p95 ms", lambda r: _ms(r["small"][1])),
            ("health idle, median ms", lambda r: _ms(statistics.median(r["idle"]))),
            ("health idle, max ms", lambda r: _ms(max(r["idle"]))),
            ("health during a long job, median ms", lambda r: _ms(statistics.median(r["busy"]))),
            ("health during a long job, max ms", lambda r: _ms(max(r["busy"]))),
            ("health probes during the long job", lambda r: f"{len(r['busy']):8d}"),
            (f"one {args.size}^2 product, 1 s deadline: status", lambda r: f"{r['one op'][0]:8d}"),
            ("  answered after its deadline, s", lambda r: f"{r['one op'][1]:8.2f}")]
    for name, cell in rows:
        print(f"{name:44}" + "".join(f"{cell(results[label]):>16}" for label in results))


if __name__ == "__main__":
    main()
