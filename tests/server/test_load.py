"""Load: 100 jobs from 10 keys, at most 16 at once, on a real server: none lost, none crossed."""

from concurrent.futures import ThreadPoolExecutor

from helpers import assert_close_in_batch
from interlace.backends.remote import RemoteBackend
from interlace.graph import Request

JOBS, KEYS, AT_ONCE = 100, 10, 16


def test_a_hundred_jobs_from_ten_keys(server, setup, local):
    # each job its own prompt and its own steering, so a crossed result cannot pass for the right one
    requests, expected = [], []
    for number in range(JOBS):
        prompt = f"w{number % 90 + 2} w{(7 * number) % 90 + 2} w{(13 * number) % 90 + 2}"
        with local.trace(prompt) as tracer:
            local.transformer.h[0].output[:, -1] += number / 10
            local.output.logits[:, -1].save()
        requests.append(Request(tracer.graph, [tracer.spec(len(tracer.graph))]))
        expected.append(tracer.results)
    backends = [RemoteBackend(server.url, setup["keys"][f"user{i}"], model="tiny-gpt2", progress=False)
                for i in range(KEYS)]

    def run(number):
        return backends[number % KEYS].run(requests[number], timeout=120).results

    with ThreadPoolExecutor(AT_ONCE) as pool:
        futures = [pool.submit(run, number) for number in range(JOBS)]
        results = [future.result(timeout=300) for future in futures]
    for number, (got, wanted) in enumerate(zip(results, expected)):
        assert got.keys() == wanted.keys(), number
        for index in wanted:  # jobs batched together: equal up to float rounding in a larger batch
            assert_close_in_batch(got[index], wanted[index], f"job {number}:")
    health = server.health()
    assert health["model_changes"] == [] and health["queued"] == {"tiny-gpt2": 0}
