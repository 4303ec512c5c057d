"""teacher.complete_with_retries: the openai client's own retries, one budget with the malformed replies it adds."""

from __future__ import annotations

import asyncio
import random

import pytest
from fault_server import RunningServer

from mire_factory.teacher import TeacherConfig, TeacherError, complete_with_retries, make_client, malformed_backoff_s

REQUEST = {"model": "t", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 16}


def ask(url: str, max_retries: int, api_key: str = "EMPTY") -> tuple[dict, int]:
    cfg = TeacherConfig(base_url=url, model="t", max_retries=max_retries, timeout=5)

    async def go():
        client = make_client(cfg, api_key)
        try:
            return await complete_with_retries(client, REQUEST, cfg)
        finally:
            await client.close()

    return asyncio.run(go())


def test_the_client_retries_transport_and_server_faults_and_we_retry_a_malformed_200():
    with RunningServer("--script", "reset,500,malformed,429") as server:
        body, attempts = ask(server.url, max_retries=4)
        stats = server.stats()
    assert body["choices"][0]["message"]["content"] and attempts == 5
    assert [stats[f"fault_{f}"] for f in ("reset", "500", "malformed", "429")] == [1, 1, 1, 1]


def test_malformed_replies_and_the_clients_retries_share_one_budget():
    with RunningServer("--script", "malformed,reset,reset") as server:
        with pytest.raises(TeacherError, match=r"^connection error \(.*\); gave up after 3 attempts$"):
            ask(server.url, max_retries=2)
        assert server.stats()["requests"] == 3 + 1  # three chat requests, then /stats
    with RunningServer("--script", "reset,malformed") as server:
        with pytest.raises(TeacherError, match=r"^malformed response \(.*\); gave up after 2 attempts$"):
            ask(server.url, max_retries=1)


def test_a_client_error_is_not_retried():
    with RunningServer(env={"FAULT_SERVER_API_KEY": "right"}) as server:
        with pytest.raises(TeacherError, match=r"^HTTP 401: ") as caught:
            ask(server.url, max_retries=5, api_key="wrong")
        assert "gave up" not in str(caught.value) and server.stats()["unauthorized"] == 1


def test_malformed_backoff_is_the_clients_schedule():
    rng = random.Random(0)
    for k in range(8):
        cap = min(8.0, 0.5 * 2**k)
        assert 0.75 * cap <= malformed_backoff_s(k, rng) <= cap
    assert len({round(malformed_backoff_s(3, rng), 6) for _ in range(20)}) > 1  # jittered
