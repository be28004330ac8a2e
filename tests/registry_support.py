"""Registries for the pull tests: Debian's docker-registry in a subprocess, and a fake.

* `RealRegistry` runs ``/usr/bin/docker-registry`` (distribution 2.8) on a free 127.0.0.1
  port from a temporary YAML config, never the packaged system service; `push` uploads a
  model from a store with the distribution API (HEAD blob, POST upload, PUT with digest,
  PUT manifest with its media type).
* `FakeRegistry` is a small Starlette app under uvicorn in a thread of its own, on
  127.0.0.1, for what a stock registry cannot do: redirects to a second host, bearer
  challenges, Ollama's list media type, 412, connections dropped or held mid-blob, wrong
  bytes and a slow server. It records every request it answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DOCKER_REGISTRY = os.environ.get("ASYNCWEIGHTS_DOCKER_REGISTRY", "/usr/bin/docker-registry")
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def registry_missing() -> str | None:
    """Why the real registry cannot run here, or None."""
    if not (os.path.isfile(DOCKER_REGISTRY) and os.access(DOCKER_REGISTRY, os.X_OK)):
        return (
            f"{DOCKER_REGISTRY} not found: install Debian's docker-registry "
            "(apt-get install -y --no-install-recommends docker-registry)"
        )
    return None


@dataclass
class RealRegistry:
    """A private docker-registry process on 127.0.0.1."""

    url: str
    process: subprocess.Popen[bytes]
    root: Path

    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path) -> Iterator[RealRegistry]:
        port = free_port()
        root = workdir / "registry-data"
        root.mkdir(parents=True)
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root}\n"
            "  delete:\n    enabled: true\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            f"http:\n  addr: 127.0.0.1:{port}\n  draintimeout: 1s\n"
        )
        log = open(workdir / "registry.log", "wb")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            [DOCKER_REGISTRY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                if process.poll() is not None:
                    log.flush()
                    raise RuntimeError(
                        f"docker-registry exited with {process.returncode}: "
                        + (workdir / "registry.log").read_text(errors="replace")[-2000:]
                    )
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/v2/", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("docker-registry did not answer GET /v2/ within 20 s")
                time.sleep(0.05)
            yield cls(url, process, root)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            log.close()

    def push(self, store_root: Path, manifest_path: Path, repository: str, tag: str) -> bytes:
        """Upload a model's blobs and manifest; returns the manifest bytes pushed."""
        return push(self.url, store_root, manifest_path, repository, tag)


def push(url: str, store_root: Path, manifest_path: Path, repository: str, tag: str) -> bytes:
    data = manifest_path.read_bytes()
    doc = json.loads(data)
    layers = [doc["config"], *doc["layers"]]
    with httpx.Client(base_url=url, timeout=30) as client:
        for layer in layers:
            digest = layer["digest"]
            head = client.head(f"/v2/{repository}/blobs/{digest}")
            if head.status_code == 200:
                continue
            assert head.status_code == 404, head
            start = client.post(f"/v2/{repository}/blobs/uploads/")
            assert start.status_code == 202, start.text
            location = start.headers["location"]
            sep = "&" if "?" in location else "?"
            body = (store_root / "blobs" / digest.replace(":", "-")).read_bytes()
            put = client.put(
                f"{location}{sep}digest={digest}",
                content=body,
                headers={"Content-Type": "application/octet-stream"},
            )
            assert put.status_code == 201, put.text
        put = client.put(
            f"/v2/{repository}/manifests/{tag}",
            content=data,
            headers={"Content-Type": doc.get("mediaType", MANIFEST_V2)},
        )
        assert put.status_code == 201, put.text
        assert put.headers["docker-content-digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    return data


# --------------------------------------------------------------------------------------- fake


@dataclass
class FakeRegistry:
    """What the fake serves and how it misbehaves; tests set the fields they need."""

    url: str = ""
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # "repo:ref"
    blobs: dict[str, bytes] = field(default_factory=dict)
    #: answer blob GETs with 307 to this base URL (another host: the CDN)
    redirect_to: str | None = None
    #: require ``Authorization: Bearer <token>`` on /v2/ requests
    token: str | None = None
    #: the token the token endpoint hands out (default: `token`)
    issued_token: str | None = None
    #: answer manifest GETs with this status and JSON error message
    manifest_status: tuple[int, str] | None = None
    #: drop the connection after this many bytes of the blob, once per entry
    drop_after: dict[str, int] = field(default_factory=dict)
    #: send these bytes instead of the blob's
    wrong: dict[str, bytes] = field(default_factory=dict)
    #: seconds to sleep between chunks of a blob body, and the chunk size
    delay: float = 0.0
    chunk: int = 64 * 1024
    #: serve blobs whose status is 5xx this many times first
    fail_first: dict[str, int] = field(default_factory=dict)
    #: once this many blob GETs were answered, hold the next ones until `gate` is set
    gate_after: int | None = None
    gate: threading.Event = field(default_factory=threading.Event)
    #: send this many bytes of the blob, then hold the rest until `release` is set (once)
    stall_after: dict[str, int] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def add_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> None:
        self.manifests[f"{repository}:{reference}"] = (data, media_type)

    def add_store_model(
        self, store_root: Path, manifest_path: Path, repository: str, tag: str
    ) -> bytes:
        data = manifest_path.read_bytes()
        doc = json.loads(data)
        for layer in [doc["config"], *doc["layers"]]:
            path = store_root / "blobs" / layer["digest"].replace(":", "-")
            self.blobs[layer["digest"]] = path.read_bytes()
        self.add_manifest(repository, tag, data, doc.get("mediaType", MANIFEST_V2))
        return data

    def log(self, request: Request, name: str) -> None:
        self.requests.append((name, request.url.path, dict(request.headers)))

    def app(self) -> Starlette:
        async def manifest(request: Request) -> Response:
            self.log(request, "manifest")
            if (denied := self._auth(request)) is not None:
                return denied
            if self.manifest_status is not None:
                status, message = self.manifest_status
                return JSONResponse(
                    {"errors": [{"code": "DENIED", "message": message}]}, status_code=status
                )
            key = f"{request.path_params['repo']}:{request.path_params['ref']}"
            if key not in self.manifests:
                return JSONResponse(
                    {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]},
                    status_code=404,
                )
            data, media_type = self.manifests[key]
            return Response(data, media_type=media_type)

        async def blob(request: Request) -> Response:
            self.log(request, "blob")
            if (denied := self._auth(request)) is not None:
                return denied
            digest = request.path_params["digest"]
            served = sum(kind == "blob" for kind, _, _ in self.requests) - 1
            if self.gate_after is not None and served >= self.gate_after:
                await anyio.to_thread.run_sync(self.gate.wait, 30)
            if self.fail_first.get(digest, 0) > 0:
                self.fail_first[digest] -= 1
                return JSONResponse({"errors": [{"message": "try later"}]}, status_code=503)
            if self.redirect_to is not None:
                return Response(
                    status_code=307,
                    headers={"Location": f"{self.redirect_to}/cdn/{digest}"},
                )
            return self._serve(request, digest)

        async def cdn(request: Request) -> Response:
            self.log(request, "cdn")
            return self._serve(request, request.path_params["digest"])

        async def token(request: Request) -> Response:
            self.log(request, "token")
            return JSONResponse({"token": self.issued_token or self.token})

        async def base(request: Request) -> Response:
            return JSONResponse({})

        return Starlette(
            routes=[
                Route("/v2/", base),
                Route("/v2/{repo:path}/manifests/{ref}", manifest),
                Route("/v2/{repo:path}/blobs/{digest}", blob),
                Route("/cdn/{digest}", cdn),
                Route("/token", token),
            ]
        )

    def _auth(self, request: Request) -> Response | None:
        if self.token is None or request.headers.get("authorization") == f"Bearer {self.token}":
            return None
        challenge = (
            f'Bearer realm="{self.url}/token",service="fake",scope="repository:library/x:pull"'
        )
        return JSONResponse(
            {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
            status_code=401,
            headers={"WWW-Authenticate": challenge},
        )

    def _serve(self, request: Request, digest: str) -> Response:
        if digest not in self.blobs:
            return JSONResponse({"errors": [{"message": "blob unknown"}]}, status_code=404)
        data = self.wrong.get(digest, self.blobs[digest])
        start, end = 0, len(data)
        status = 200
        headers = {"Accept-Ranges": "bytes"}
        spec = request.headers.get("range")
        if spec and spec.startswith("bytes="):
            first, _, last = spec[6:].partition("-")
            start = int(first)
            end = int(last) + 1 if last else len(data)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = data[start:end]
        headers["Content-Length"] = str(len(body))
        drop = self.drop_after.pop(digest, None)
        stall = self.stall_after.pop(digest, None)
        delay, chunk = self.delay, self.chunk

        async def stream() -> AsyncIterator[bytes]:
            sent = 0
            for i in range(0, len(body), chunk):
                piece = body[i : i + chunk]
                if stall is not None and start + sent <= stall < start + sent + len(piece):
                    cut = stall - start - sent
                    yield piece[:cut]
                    await anyio.to_thread.run_sync(self.release.wait, 30)
                    piece = piece[cut:]
                    sent += cut
                if drop is not None and start + sent + len(piece) > drop:
                    cut = max(0, drop - start - sent)
                    yield piece[:cut]
                    raise ConnectionAbortedError("fake registry drops the connection")
                if delay:
                    await anyio.sleep(delay)
                yield piece
                sent += len(piece)

        return StreamingResponse(stream(), status_code=status, headers=headers)


class ServerThread:
    """Run an ASGI app under uvicorn on 127.0.0.1 in a thread; stopped on exit."""

    def __init__(self, app: Starlette) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="critical", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="fake-registry")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake registry did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "fake registry thread did not stop"


@contextlib.contextmanager
def fake_registry() -> Iterator[tuple[FakeRegistry, FakeRegistry]]:
    """A fake registry and a second host (the CDN it redirects to), both running."""
    registry, cdn = FakeRegistry(), FakeRegistry()
    cdn.blobs = registry.blobs
    try:
        with ServerThread(registry.app()) as a, ServerThread(cdn.app()) as b:
            registry.url, cdn.url = a.url, b.url
            yield registry, cdn
            registry.gate.set()  # let held requests end before the servers stop
            registry.release.set()
    finally:
        registry.gate.set()
        registry.release.set()
