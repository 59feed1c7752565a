"""Ray Serve scale-out: two replicas behind one endpoint on a local two-node cluster (``server.scaleout``).

Spread and output equality with the single-process server, streaming through the ingress with the
openai SDK, prefix-affinity routing with cached prompt tokens, and a replica killed under load.
"""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import openai
import pytest

from live_server import LiveServer
from prometheus_server import Prometheus, prometheus_binary
from ray_cluster import delta, live_replicas, ray, ray_server, requests_by_replica, serve, two_node_cluster, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPTS = [f"Name a fruit whose name starts with the letter {chr(ord('a') + i)}." for i in range(16)]
# ~330 tokens shared by the prefix-affinity requests (a system prompt, as a chat app sends with every turn)
SHARED_PREFIX = " ".join(f"Rule {i}: answer politely, cite the manual section {i}, and keep replies short."
                         for i in range(1, 23))


@pytest.fixture(scope="module")
def cluster():
    yield from two_node_cluster()


@pytest.fixture(scope="module")
def app(cluster):
    with ray_server(cluster, "--replicas", "2") as server:
        wait_for(lambda: len(live_replicas(server.url)) == 2, 180, "both replicas")
        yield server


@pytest.fixture(scope="module")
def reference():
    """The single-process server, one torch thread like each replica."""
    os.environ["OMP_NUM_THREADS"], previous = "1", os.environ.get("OMP_NUM_THREADS")
    try:
        server = LiveServer()
    finally:
        if previous is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    with server:
        yield server


def chat(text: str, system: str | None = None, **extra) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return {"model": "default", "messages": messages, "max_tokens": 24, "temperature": 0, **extra}


async def gather_chats(url: str, requests: list[dict]) -> list:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        return await asyncio.gather(*(client.chat.completions.create(**r) for r in requests))


def test_two_replicas_serve_one_endpoint_with_the_single_process_outputs(app, reference):
    before = requests_by_replica(app.url)
    replies = asyncio.run(gather_chats(app.url, [chat(p) for p in PROMPTS]))
    spread = delta(before, wait_for(lambda: (c := requests_by_replica(app.url)) and
                                    sum(delta(before, c).values()) == 16 and c, 10, "16 counted requests"))
    assert len(spread) == 2 and all(n > 0 for n in spread.values()), spread
    expected = asyncio.run(gather_chats(reference.url, [chat(p) for p in PROMPTS]))
    assert [r.choices[0].message.content for r in replies] == [r.choices[0].message.content for r in expected]
    assert all(r.model_extra["knn_ssd"]["target"] == e.model_extra["knn_ssd"]["target"]
               for r, e in zip(replies, expected))

    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(**chat(PROMPTS[3]), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        replies[3].choices[0].message.content
    assert chunks[-1].model_extra["knn_ssd"]["verify_steps"] > 0
    with pytest.raises(openai.NotFoundError) as err:  # the single-process server's errors, through the ingress
        client.chat.completions.create(**chat("hi", model="other"))
    assert err.value.body["code"] == "model_not_found"


def test_prometheus_scrapes_every_replica_with_its_label(app, tmp_path):
    """docker/prometheus.yml's one scrape config, aimed at the application, sees both replicas' series."""
    prometheus = Prometheus(prometheus_binary(), app.url.removeprefix("http://"), tmp_path)
    try:
        replicas = sorted(live_replicas(app.url))
        assert sorted(prometheus.label_values('knn_ssd_requests_running{model="default"}', "replica")) == replicas
        served = prometheus.query('sum by (replica) (knn_ssd_requests_total{status="200"})')
        assert sorted(r["metric"]["replica"] for r in served if float(r["value"][1]) > 0) == replicas
    finally:
        prometheus.stop()


def test_requests_sharing_a_prefix_land_on_one_replica_and_hit_its_prefix_cache(app):
    prefix_tokens = httpx.post(f"{app.url}/tokenize", json={"prompt": SHARED_PREFIX}).json()["count"]
    assert prefix_tokens >= 300
    before = requests_by_replica(app.url)
    first = asyncio.run(gather_chats(app.url, [chat("What is rule 3?", SHARED_PREFIX)]))[0]
    assert first.usage.prompt_tokens > prefix_tokens
    later = asyncio.run(gather_chats(app.url, [chat(f"What is rule {i}?", SHARED_PREFIX) for i in range(4, 11)]))
    landed = delta(before, wait_for(lambda: (c := requests_by_replica(app.url)) and
                                    sum(delta(before, c).values()) == 8 and c, 10, "8 counted requests"))
    assert list(landed.values()) == [8], landed
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in later]
    assert all(c >= prefix_tokens - 16 for c in cached), (cached, prefix_tokens)


async def stream_outcome(client: openai.AsyncOpenAI, request: dict, started: asyncio.Event) -> str:
    """'ok' for a stream that finished, the error's code for one that ended with an OpenAI error."""
    try:
        stream = await client.chat.completions.create(**request, stream=True)
        finish = None
        async for chunk in stream:
            started.set()
            finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
        return "ok" if finish else "unfinished"
    except openai.APIError as exc:
        return str((exc.body or {}).get("code") if isinstance(exc.body, dict) else exc)


def test_a_killed_replica_ends_its_requests_with_errors_and_is_replaced(app):
    directory = ray.get_actor("knn-ssd-replicas:knn-ssd", namespace="serve")
    victim = ray.get(directory.entries.remote())[0]
    requests = [chat(p, max_tokens=160, extra_body={"ignore_eos": True}) for p in PROMPTS]

    async def load() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0,
                                      timeout=120) as client:
            started = [asyncio.Event() for _ in requests]
            tasks = [asyncio.create_task(stream_outcome(client, r, s)) for r, s in zip(requests, started)]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started[:4])), 120)
            os.kill(victim.pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 150)  # no request hangs

    outcomes = asyncio.run(load())
    assert set(outcomes) <= {"ok", "replica_failed"}, outcomes
    assert "replica_failed" in outcomes and "ok" in outcomes, outcomes
    after = asyncio.run(gather_chats(app.url, [chat(p) for p in PROMPTS[:4]]))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in after)
    wait_for(lambda: (live := live_replicas(app.url)) and len(live) == 2 and victim.replica not in live,
             240, "Ray to replace the killed replica")

    def healthy() -> bool:  # Serve marks the new replica running shortly after it lists itself
        status = serve.status().applications["knn-ssd"].deployments["EngineReplica"]
        return status.status == "HEALTHY" and status.replica_states.get("RUNNING") == 2
    wait_for(healthy, 60, "Ray Serve to report the deployment healthy again")
