"""examples/server.py for real: uvicorn in a subprocess on 127.0.0.1, driven with httpx.

Each group of a load is slowed down in the server process (a wrapper around the loader's
worker call), so that clients can be caught mid-load; the timing figures themselves are
measured by examples/bench_server.py, not here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

from asyncweights.testing import StoreBuilder, random_weights

from .server_support import SERVER, serve

KiB = 1 << 10
TENSORS = 16
MODEL_BYTES = TENSORS * 128 * KiB
GROUP_DELAY = 0.05  # 16 groups on 2 workers: about 0.4 s a load
TESTS = ("order", "twenty", "leave", "alone", "health", "delete")
BACKENDS = ("asyncio", "trio")

LAUNCH = f"""
import runpy, sys, time
import asyncweights._load as load

real = load.load_group

def slow(*args):
    time.sleep({GROUP_DELAY})
    return real(*args)

load.load_group = slow
sys.argv = [{str(SERVER)!r}, *sys.argv[1:]]
runpy.run_path({str(SERVER)!r}, run_name="__main__")
"""

Event = dict[str, Any]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server's base URL, serving a store with one model per test and backend."""
    root = tmp_path_factory.mktemp("server") / "store"
    builder = StoreBuilder(root)
    for seed, name in enumerate(f"{t}-{b}" for t in TESTS for b in BACKENDS):
        shapes = {f"transformer/blocks.{i}.weight": (64, 1024) for i in range(TENSORS)}
        builder.add_model(name, random_weights(shapes, seed=seed))
    args = ["--store", str(root), "--port", "0", "--group-bytes", str(128 * KiB)]
    with serve(["-c", LAUNCH, *args]) as (url, _):
        yield url


@pytest.fixture
def client(server: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server, timeout=30)


def model(test: str, anyio_backend: str) -> str:
    return f"{test}-{anyio_backend}"


async def load(
    client: httpx.AsyncClient, name: str, *, until: Callable[[Event], bool] | None = None
) -> list[Event]:
    """POST /load and collect its events; disconnect as soon as `until` holds for one."""
    if until is not None:
        return await load_and_leave(client, name, until)
    events: list[Event] = []
    body = {"model": name, "component": "transformer"}
    async with client.stream("POST", "/load", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    return events


async def load_and_leave(
    client: httpx.AsyncClient, name: str, until: Callable[[Event], bool]
) -> list[Event]:
    """The same over a plain socket, closed once `until` holds (or at the end): how a tab
    that goes away looks to the server. httpx's iterators, left half-read, would be
    collected unclosed."""
    body = json.dumps({"model": name, "component": "transformer"}).encode()
    request = (
        f"POST /load HTTP/1.1\r\nHost: {client.base_url.host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    events: list[Event] = []
    buffer = b""
    port = client.base_url.port
    assert port is not None
    async with await anyio.connect_tcp(client.base_url.host, port) as stream:
        await stream.send(request + body)
        while True:
            try:
                buffer += await stream.receive()
            except anyio.EndOfStream:
                return events
            *lines, buffer = buffer.split(b"\n")
            # Chunk-size lines and blank lines never start with "data: ".
            for line in lines:
                if line.startswith(b"data: "):
                    events.append(json.loads(line.removeprefix(b"data: ")))
                    if until(events[-1]):
                        return events


def mid_load(event: Event) -> bool:
    completed: int = event.get("completed", 0)
    return 0 < completed < MODEL_BYTES


async def stats(client: httpx.AsyncClient) -> dict[str, int]:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    return dict(response.json()["stats"])


async def test_progress_events_arrive_in_order_and_end_in_success(
    client: httpx.AsyncClient, anyio_backend: str
) -> None:
    name = model("order", anyio_backend)
    async with client:
        events = await load(client, name)
        again = await load(client, name)
    assert events[0] == {"status": "pulling manifest"}
    loading = events[1:-1]
    assert len(loading) >= 2
    assert all(e["status"] == f"loading {name}" and e["total"] == MODEL_BYTES for e in loading)
    completed = [e["completed"] for e in loading]
    assert completed == sorted(completed)
    final = {"status": "success", "digest": name, "total": MODEL_BYTES, "completed": MODEL_BYTES}
    assert events[-1] == final
    assert again == [final]  # cached: the final event alone


async def test_twenty_clients_cause_one_load(client: httpx.AsyncClient, anyio_backend: str) -> None:
    name = model("twenty", anyio_backend)
    results: list[list[Event]] = []
    async with client:
        before = await stats(client)

        async def one() -> None:
            results.append(await load(client, name))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
        after = await stats(client)
        listed = (await client.get("/models")).json()
    assert len(results) == 20
    assert all(events[-1]["status"] == "success" for events in results)
    assert after["loads"] - before["loads"] == 1
    shared = (after["joins"] - before["joins"]) + (after["hits"] - before["hits"])
    assert shared == 19
    entry = next(e for e in listed["models"] if e["name"] == f"{name}:latest")
    assert (entry["state"], entry["size"], entry["leases"]) == ("ready", MODEL_BYTES, 0)
    assert f"{name}:latest" in listed["available"]


async def test_a_client_leaving_mid_load_does_not_break_the_others(
    client: httpx.AsyncClient, anyio_backend: str
) -> None:
    name = model("leave", anyio_backend)
    stayed: list[list[Event]] = []
    async with client:
        before = await stats(client)

        async def stays() -> None:
            stayed.append(await load(client, name))

        async with anyio.create_task_group() as tg:
            tg.start_soon(stays)
            tg.start_soon(stays)
            left = await load(client, name, until=mid_load)
        after = await stats(client)
    assert mid_load(left[-1])
    assert [events[-1]["completed"] for events in stayed] == [MODEL_BYTES, MODEL_BYTES]
    assert [events[-1]["status"] for events in stayed] == ["success", "success"]
    assert after["loads"] - before["loads"] == 1
    assert after["cancellations"] == before["cancellations"]


async def test_the_last_client_leaving_cancels_the_load(
    client: httpx.AsyncClient, anyio_backend: str
) -> None:
    name = model("alone", anyio_backend)
    async with client:
        before = await stats(client)
        await load(client, name, until=mid_load)
        # The load ends a moment after the disconnect is seen; its reservation with it.
        with anyio.fail_after(5):
            while True:  # the state is in another process: poll it
                now = await stats(client)
                if now["cancellations"] > before["cancellations"] and not now["bytes_reserved"]:
                    break
                await anyio.sleep(0.02)
        assert (now["cancellations"] - before["cancellations"], now["loading"]) == (1, 0)
        assert now["waiters"] == 0
        events = await load(client, name)  # a fresh load, complete
        assert events[-1]["status"] == "success"
        assert (await stats(client))["loads"] - before["loads"] == 2


async def test_health_answers_while_a_load_runs(
    client: httpx.AsyncClient, anyio_backend: str
) -> None:
    name = model("health", anyio_backend)
    seen: list[dict[str, int]] = []
    async with client, anyio.create_task_group() as tg:
        started = anyio.Event()

        def note(event: Event) -> bool:
            if mid_load(event):
                started.set()
            return False  # keep streaming to the end

        tg.start_soon(lambda: load(client, name, until=note))
        await started.wait()
        for _ in range(5):
            seen.append(await stats(client))  # status 200: timing is bench_server.py's job
    assert any(s["loading"] == 1 for s in seen)


async def test_models_can_be_evicted_by_name(client: httpx.AsyncClient, anyio_backend: str) -> None:
    name = model("delete", anyio_backend)
    async with client:
        await load(client, name)
        deleted = await client.delete(f"/models/{name}")
        missing = await client.delete(f"/models/{name}:latest")
        invalid = await client.delete("/models/Bad Name!")
        failed = await load(client, "no-such-model")
        bad_body = await client.post("/load", content=b"not json")
    assert deleted.status_code == 200
    assert [e["name"] for e in deleted.json()["evicted"]] == [f"{name}:latest"]
    assert missing.status_code == 404
    assert missing.json() == {"error": f"'{name}:latest' is not in the cache"}
    assert invalid.status_code == 400
    assert len(failed) == 1
    assert failed[0]["error"].startswith("model not found in store")
    assert bad_body.status_code == 400
