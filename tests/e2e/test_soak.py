"""Load and hostile bodies against a real `offramp serve`: a soak of mixed requests with random
abandons leaves nothing behind, /health answers while a 10 MB prompt is refused, and a body over
the limit gets its 413 over the socket."""
import asyncio
import json
import random
import time

import httpx

from tests.e2e.conftest import eventually, idle

NUM_REQUESTS = 300
CONCURRENCY = 24
RSS_GROWTH_BOUND = 32 << 20  # bytes the server may grow by over the soak (measured: 1 to 3 MiB)
MESSAGES = [{"role": "user", "content": "what is the capital of france"}]


async def one_request(client: httpx.AsyncClient, rng: random.Random) -> str:
    """A random request, maybe abandoned at a random moment or after its first streamed token; returns
    what happened to it."""
    abandon = rng.choice([None] * 7 + ["at a random moment"] * 2 + ["mid-stream"])
    kind = rng.choice(["completion", "chat"] if abandon == "mid-stream" else ["completion", "chat", "batch", "bad"])
    stream = abandon == "mid-stream" or (rng.random() < 0.5 and kind != "batch")
    body = {"max_tokens": 64 if abandon == "mid-stream" else rng.randint(1, 24), "temperature": rng.choice([0, 0.8]),
            "n": rng.choice([1, 1, 2]), "stream": stream, "ignore_eos": abandon == "mid-stream" or rng.random() < 0.5}
    if kind == "chat":
        path, body = "/v1/chat/completions", body | {"messages": MESSAGES}
    elif kind == "bad":
        path, body = "/v1/completions", body | rng.choice([{"prompt": [10 ** 9]}, {"prompt": "hi", "top_p": 7},
                                                           {"prompt": "x" * 100_000}, {"messages": 5}])
    else:
        prompts = ["hello world", "the quick brown fox jumps", "one two three"]
        path, body = "/v1/completions", body | {"prompt": prompts if kind == "batch" else rng.choice(prompts)}

    async def send() -> str:
        if not stream:
            response = await client.post(path, json=body)
            return f"{response.status_code}"
        events = []
        async with client.stream("POST", path, json=body) as response:
            async for line in response.aiter_lines():
                events += [line] if line.startswith("data: ") else []
                if abandon == "mid-stream" and events:
                    return "abandoned"  # leaving the block closes the connection
        assert response.status_code != 200 or events[-1] == "data: [DONE]"
        return f"{response.status_code}"

    try:
        status = await (asyncio.wait_for(send(), rng.uniform(0.0, 0.3)) if abandon == "at a random moment" else send())
    except TimeoutError:
        return "abandoned"
    if status == "abandoned":
        return status
    assert status == ("400" if kind == "bad" else "200"), (kind, body)
    return status


async def soak(client: httpx.AsyncClient, num_requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    slots = asyncio.Semaphore(CONCURRENCY)

    async def limited(request_rng):
        async with slots:
            return await one_request(client, request_rng)

    return await asyncio.gather(*[limited(random.Random(rng.random())) for _ in range(num_requests)])


async def test_a_soak_with_random_abandons_leaves_nothing_behind(server):
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client:
        await soak(client, 40, seed=1)  # warm-up: lazily made buffers and caches exist before RSS is read
        before = await eventually(lambda: idle(client), "the server to be idle after the warm-up")
        rss_before = rss(server.proc.pid)
        start = time.monotonic()
        outcomes = await asyncio.wait_for(soak(client, NUM_REQUESTS, seed=2), 300)
        seconds = time.monotonic() - start
        values = await eventually(lambda: idle(client), "KV blocks and gauges back to 0 after the soak")
        growth = rss(server.proc.pid) - rss_before
        assert {"200", "400", "abandoned"} <= set(outcomes), outcomes
        assert values["abort"] > before["abort"]  # the streams left mid-way, at least, were aborted in the engine
        assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB over {NUM_REQUESTS} requests"
        assert (await client.get("/health")).status_code == 200
        fresh = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert fresh.status_code == 200, fresh.text
        print(f"soak: {NUM_REQUESTS} requests in {seconds:.1f} s, {outcomes.count('abandoned')} abandoned, "
              f"RSS {growth / 2**20:+.1f} MiB")


def rss(pid: int) -> int:
    """Resident bytes of a process (Linux)."""
    line = next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


async def test_health_answers_while_a_10_mb_prompt_is_refused(server):
    body = json.dumps({"prompt": "hello world " * 900_000}).encode()  # 10.8 MB: 3.4M tokens of SmolLM2
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        latencies = []

        async def poll_health():
            while True:
                start = time.monotonic()
                assert (await client.get("/health")).status_code == 200
                latencies.append(time.monotonic() - start)
                await asyncio.sleep(0.05)

        poller = asyncio.create_task(poll_health())
        response = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        answered = len(latencies)

        async def answers_since():
            return len(latencies) >= answered + 3

        await eventually(answers_since, "a few more /health answers")
        poller.cancel()
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert "max_model_len" in response.json()["error"]["message"]
    assert max(latencies) < 3.0, latencies  # tokenizing it would take tens of seconds, holding the GIL


def test_a_body_over_the_limit_gets_413_over_the_socket(server):
    body = b'{"prompt": "' + b"a" * (33 << 20) + b'"}'  # the default limit is 32 MiB
    response = httpx.post(server.url + "/v1/completions", content=body, timeout=120,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/health").status_code == 200
