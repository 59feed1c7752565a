"""Ray Serve autoscaling between --min-replicas 1 and --max-replicas 2 on a local two-node cluster."""

from __future__ import annotations

import threading

import openai
import pytest

from ray_cluster import live_replicas, ray_server, two_node_cluster, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def cluster():
    yield from two_node_cluster()


def test_a_queue_adds_the_second_replica_and_idleness_removes_it(cluster):
    with ray_server(cluster, "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "2",
                    "--upscale-delay-s", "1", "--downscale-delay-s", "4", "--autoscale-window-s", "2") as app:
        assert len(wait_for(lambda: live_replicas(app.url), 60, "the first replica")) == 1
        client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0, timeout=300)
        stop, finished = threading.Event(), []

        def client_loop(i: int) -> None:  # requests back to back until the test has seen the second replica
            while not stop.is_set():
                reply = client.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": f"Count from {i} to {i + 50}."}],
                    max_tokens=64, temperature=0, extra_body={"ignore_eos": True})
                finished.append(reply.choices[0].finish_reason)

        load = [threading.Thread(target=client_loop, args=(i,)) for i in range(12)]  # 12 ongoing: 6x the target
        for t in load:
            t.start()
        try:
            wait_for(lambda: len(live_replicas(app.url)) == 2, 180, "the second replica under load")
        finally:
            stop.set()
            for t in load:
                t.join(300)
        assert finished and set(finished) == {"length"}
        wait_for(lambda: len(live_replicas(app.url)) == 1, 120, "idleness to remove a replica", interval=1)
