"""examples/server.py under hostile requests: real uvicorn on 127.0.0.1, driven with httpx.

Every request is bounded in time; after each test the server still answers /health, holds
no descriptor into the store and has not grown.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from asyncweights.testing import StoreBuilder, random_weights

from .server_support import SERVER, serve

MAX_BODY = 64 * 1024


class Server:
    def __init__(self, url: str, proc: subprocess.Popen[str], root: Path) -> None:
        self.url = url
        self.proc = proc
        self.root = root

    def store_fds(self) -> list[str]:
        out = []
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if target.startswith(str(self.root)):
                out.append(target)
        return out

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("hostile-server") / "store"
    builder = StoreBuilder(root)
    builder.add_model("good", random_weights({"vae/w": (16, 16)}))
    # A header that passes nothing: the failure comes after the event stream started.
    bad = builder.add_bytes("vae/w", (2).to_bytes(8, "little") + b"[]")
    builder.write_manifest("broken", [bad])
    fifo = builder.add_model("fifo", random_weights({"vae/w": (4,)}, seed=1))
    blob = root / "blobs" / fifo.layers[0].digest.replace(":", "-")
    blob.unlink()
    os.mkfifo(blob)
    with serve([str(SERVER), "--store", str(root), "--port", "0"]) as (url, proc):
        yield Server(url, proc, root)


@pytest.fixture
async def client(server: Server) -> Any:
    before = server.rss()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        yield c
        with anyio.fail_after(10):
            health = await c.get("/health")
    assert health.status_code == 200
    assert server.store_fds() == []
    assert server.rss() - before < 64 << 20  # a 1 GiB /dev/zero read would show here


async def post(client: httpx.AsyncClient, body: bytes) -> httpx.Response:
    with anyio.fail_after(10):
        return await client.post("/load", content=body)


async def events(client: httpx.AsyncClient, model: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    with anyio.fail_after(30):
        async with client.stream("POST", "/load", json={"model": model}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    got.append(json.loads(line.removeprefix("data: ")))
    return got


HOSTILE = [
    "/dev/zero",
    "/etc/shadow",
    "/proc/self/environ",
    "~root/.bashrc",
    "../../../../etc/passwd",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e/%2e%2e/etc/passwd",
    "./good",
    "good\0",
    "http://127.0.0.1:1/x",
    "a" * 100,
]


@pytest.mark.parametrize("name", HOSTILE)
async def test_anything_but_a_model_name_is_a_400(
    client: httpx.AsyncClient, server: Server, name: str
) -> None:
    response = await post(client, json.dumps({"model": name}).encode())
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error.startswith("invalid model name: ")
    assert str(server.root) not in response.text
    for value in (1, None, ["good"], {"a": 1}):
        response = await post(client, json.dumps({"model": value}).encode())
        assert response.status_code == 400
        assert response.json() == {"error": '"model" must be a model name (a string)'}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_cap_is_a_413(client: httpx.AsyncClient, chunked: bool) -> None:
    body = b'{"model": "' + b"x" * (256 << 10) + b'"}'

    step = 16 << 10

    async def pieces() -> Any:
        for i in range(0, len(body), step):
            yield body[i : i + step]

    with anyio.fail_after(10):
        response = await client.post("/load", content=pieces() if chunked else body)
    assert response.status_code == 413
    assert response.json() == {"error": f"the request body is over {MAX_BODY} bytes"}


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{", 400, "the body must be JSON"),
        (b'{"model": "good"', 400, "the body must be JSON"),
        (b'{"model": "\xff"}', 400, "the body must be JSON"),
        (b"[]", 400, "the body must be a JSON object"),
        (b"null", 400, "the body must be a JSON object"),
        (b"[" * 30_000 + b"]" * 30_000, 400, "the body is JSON nested too deeply"),
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 400, "the body is JSON nested too deeply"),
        (b"[" * 100_000 + b"]" * 100_000, 413, f"the request body is over {MAX_BODY} bytes"),
        (b'{"model": "good", "component": 5}', 400, '"component" must be a string or null'),
    ],
)
async def test_malformed_or_too_deep_json_is_a_400(
    client: httpx.AsyncClient, body: bytes, status: int, error: str
) -> None:
    response = await post(client, body)
    assert (response.status_code, response.json()) == (status, {"error": error})


async def test_a_missing_model_is_one_error_event_without_server_paths(
    client: httpx.AsyncClient, server: Server
) -> None:
    got = await events(client, "absent:latest")
    assert len(got) == 1
    error = got[0]["error"]
    assert error.startswith("model not found in store '<path>'")
    assert "model 'absent:latest'" in error
    assert str(server.root) not in error


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("broken", "header is a JSON list, not an object"),
        ("fifo", "blob is not a regular file (a FIFO)"),
    ],
)
async def test_a_failure_after_the_stream_started_is_an_error_event_then_the_end(
    client: httpx.AsyncClient, server: Server, model: str, reason: str
) -> None:
    got = await events(client, model)
    assert [list(e) for e in got] == [["error"]]
    assert got[0]["error"].startswith(reason)
    assert f"model '{model}'" in got[0]["error"]
    assert str(server.root) not in got[0]["error"]
    assert "(model" in got[0]["error"]
    assert ", file " not in got[0]["error"]
    # The server goes on serving: a good model loads after.
    assert (await events(client, "good"))[-1]["status"] == "success"


async def test_the_server_still_loads_after_hostile_requests(client: httpx.AsyncClient) -> None:
    for name in HOSTILE:
        assert (await post(client, json.dumps({"model": name}).encode())).status_code == 400
    got = await events(client, "good")
    assert got[-1]["status"] == "success"
