"""/metrics parses with prometheus_client and counters move by the amounts of a known request."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


def test_counters_move_by_request_amounts(server):
    before = scrape(server.url)
    r = httpx.post(server.url + "/v1/completions", json={
        "model": "default", "prompt": "List three animals:", "max_tokens": 20, "temperature": 0,
        "ignore_eos": True}, timeout=120).json()
    ext, use = r["knn_ssd"], r["usage"]
    after = scrape(server.url)
    d = lambda name, **kw: total(after, name, **kw) - total(before, name, **kw)  # noqa: E731
    assert d("knn_ssd_requests_total", status="200", finish_reason="length") == 1
    assert d("knn_ssd_prompt_tokens_total") == use["prompt_tokens"]
    assert d("knn_ssd_generation_tokens_total") == use["completion_tokens"] == 20
    assert d("knn_ssd_draft_tokens_total") == ext["draft_tokens"]
    assert d("knn_ssd_accepted_tokens_total") == ext["accepted_tokens"]
    assert d("knn_ssd_verify_steps_total") == ext["verify_steps"]
    assert d("knn_ssd_routing_decisions_total") == 1
    assert d("knn_ssd_time_to_first_token_seconds_count") == 1
    assert d("knn_ssd_e2e_request_latency_seconds_count") == 1
    assert d("knn_ssd_queue_time_seconds_count") == 1
    assert d("knn_ssd_inter_token_latency_seconds_count") == 19
    assert total(after, "knn_ssd_requests_running") == 0
    assert total(after, "knn_ssd_speedup", domain="plain") == 1.0


def test_no_created_timestamp_series(server):
    names = {name for name, _ in scrape(server.url)}
    assert "knn_ssd_requests_total" in names and not any(name.endswith("_created") for name in names)


def test_error_requests_are_counted(server):
    before = scrape(server.url)
    httpx.post(server.url + "/v1/completions", json={"model": "default", "prompt": "a", "top_p": 3})
    after = scrape(server.url)
    assert total(after, "knn_ssd_requests_total", status="400") - total(before, "knn_ssd_requests_total",
                                                                         status="400") == 1


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_stops_generation(server, stream):
    samples = scrape(server.url)
    before = total(samples, "knn_ssd_generation_tokens_total")
    lost = total(samples, "knn_ssd_requests_total", status="499")
    body = {"model": "default", "prompt": "Tell a very long story.", "max_tokens": 2000, "temperature": 0,
            "stream": stream, "ignore_eos": True}
    if stream:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
    else:  # the client gives up waiting for the whole answer
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=1.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if total(scrape(server.url), "knn_ssd_requests_running") == 0:
            break
        time.sleep(0.2)
    samples = scrape(server.url)
    assert total(samples, "knn_ssd_requests_running") == 0
    # generation stopped soon after the disconnect (within a step of it, or of the next check for a client
    # that waits for the whole answer), far short of max_tokens
    assert total(samples, "knn_ssd_generation_tokens_total") - before < (100 if stream else 1000)
    assert total(samples, "knn_ssd_requests_total", status="499") - lost == 1
