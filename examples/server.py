"""A model-loading HTTP server on `asyncweights.WeightCache` (Starlette, run by uvicorn).

    pip install 'asyncweights[server]'
    python examples/server.py --store ~/.ollama/models --port 8000
    curl -N localhost:8000/load -d '{"model": "z-image", "component": "vae"}'
    curl -N localhost:8000/pull -d '{"model": "z-image", "registry": "http://127.0.0.1:5000"}'

Endpoints:
    POST   /load           {"model", "component"?}: load into the cache (or join the load in
                           flight); progress streams back as Server-Sent Events in Ollama's
                           pull-progress shape, ending with {"status": "success"} or {"error"}.
    POST   /pull           {"model", "registry"?, "insecure"?}: pull the model from its
                           registry into the store; Ollama's pull progress (per blob:
                           "pulling <digest>", total, completed; "writing manifest") streams
                           back as Server-Sent Events, ending with {"status": "success"} or
                           {"error"}. A client that disconnects cancels its pull (verified
                           blobs and the partial download stay for the next pull).
    GET    /models         the cache's entries, the store's models, and the cache's counters.
    DELETE /models/{name}  evict the unleased entries of a model.
    GET    /health         liveness and counters; answers at once while loads run.

A client that disconnects stops waiting; the load goes on for the other clients and is
cancelled when the last one leaves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import asyncweights as aw

if TYPE_CHECKING:
    from asyncweights._cache import CacheEntry

STORE_ENV = "ASYNCWEIGHTS_STORE"


def create_app(
    store: str | os.PathLike[str] | None = None,
    *,
    max_bytes: int | None = None,
    limits: aw.Limits | None = None,
) -> Starlette:
    """The ASGI app; its `WeightCache` lives as long as the app (its lifespan)."""
    store = store or os.environ.get(STORE_ENV) or None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            aw.WeightCache(max_bytes, store=store, limits=limits) as cache,
            anyio.create_task_group() as tg,
        ):
            app.state.cache = cache
            app.state.pulls = tg  # pulls run here: a response cannot own a task group
            yield
            tg.cancel_scope.cancel()

    return Starlette(
        routes=[
            Route("/load", load, methods=["POST"]),
            Route("/pull", pull, methods=["POST"]),
            Route("/models", list_models, methods=["GET"]),
            Route("/models/{name:path}", delete_model, methods=["DELETE"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


async def load(request: Request) -> Response:
    cache: aw.WeightCache = request.app.state.cache
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "the body must be JSON"}, status_code=400)
    model = body.get("model") if isinstance(body, dict) else None
    component = body.get("component") if isinstance(body, dict) else None
    if not isinstance(model, str) or not isinstance(component, str | None):
        return JSONResponse(
            {"error": 'expected {"model": str, "component": str | null}'}, status_code=400
        )

    async def events() -> AsyncIterator[str]:
        # Holds the cache's waiter slot while the client is connected: a disconnect cancels
        # this generator, which leaves the load (cancelling it if no one else waits).
        try:
            async with cache.progress(model, component) as progress:
                async for event in progress:
                    yield _sse(event.to_ollama())
        except aw.AsyncWeightsError as exc:
            yield _sse({"error": str(exc)})

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


async def pull(request: Request) -> Response:
    cache: aw.WeightCache = request.app.state.cache
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "the body must be JSON"}, status_code=400)
    body = body if isinstance(body, dict) else {}
    model, registry = body.get("model"), body.get("registry")
    insecure = body.get("insecure", False)
    if (
        not isinstance(model, str)
        or not isinstance(registry, str | None)
        or not isinstance(insecure, bool)
    ):
        return JSONResponse(
            {"error": 'expected {"model": str, "registry": str | null, "insecure": bool}'},
            status_code=400,
        )
    # Events are rate-limited (about 10 a second), so an unbounded buffer stays small.
    send, receive = anyio.create_memory_object_stream[dict[str, Any]](math.inf)
    scope = anyio.CancelScope()

    async def forward(event: aw.Progress) -> None:
        await send.send(event.to_ollama())

    async def run() -> None:
        with scope, send:
            try:
                await aw.pull(
                    model,
                    store=cache.store,
                    registry=registry,
                    insecure=insecure,
                    on_progress=forward,
                    limits=cache.limits,
                )
            except aw.AsyncWeightsError as exc:
                await send.send({"error": str(exc)})

    request.app.state.pulls.start_soon(run)

    async def events() -> AsyncIterator[str]:
        try:
            with receive:
                async for event in receive:
                    yield _sse(event)
        finally:
            scope.cancel()  # the client went away (or the pull ended): stop it

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


async def list_models(request: Request) -> Response:
    cache: aw.WeightCache = request.app.state.cache
    available = [str(name) async for name in cache.store.models()]
    return JSONResponse(
        {
            "models": [_entry(e) for e in cache.entries()],
            "available": available,
            "stats": dataclasses.asdict(cache.stats),
        }
    )


async def delete_model(request: Request) -> Response:
    cache: aw.WeightCache = request.app.state.cache
    name = request.path_params["name"]
    try:
        dropped = cache.evict(name)
    except aw.InvalidNameError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    if not dropped:
        kept = [e for e in cache.entries() if name in (e.name, e.model, e.key.digest)]
        reason = "leased or loading" if kept else "not in the cache"
        return JSONResponse({"error": f"{name!r} is {reason}"}, status_code=404)
    return JSONResponse({"evicted": [_entry(e) for e in dropped]})


async def health(request: Request) -> Response:
    cache: aw.WeightCache = request.app.state.cache
    return JSONResponse({"status": "ok", "stats": dataclasses.asdict(cache.stats)})


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _entry(entry: CacheEntry) -> dict[str, Any]:
    progress = entry.progress
    return {
        "model": entry.model,
        "name": entry.name,
        "component": entry.key.component,
        "dtype": entry.key.dtype,
        "digest": entry.key.digest,
        "state": entry.state,
        "size": entry.nbytes,
        "leases": entry.leases,
        "waiters": entry.waiters,
        "completed": None if progress is None else progress.completed_bytes,
        "total": None if progress is None else progress.total_bytes,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--store",
        default=os.environ.get(STORE_ENV),
        help=f"models root (default ${STORE_ENV}, else $OLLAMA_MODELS, else ~/.ollama/models)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--max-bytes", type=int, default=None, help="the cache's budget")
    parser.add_argument("--group-bytes", type=int, default=None, help="Limits.group_bytes")
    parser.add_argument("--workers", type=int, default=None, help="Limits.workers")
    args = parser.parse_args(argv)

    knobs = {"group_bytes": args.group_bytes, "workers": args.workers}
    given = {name: value for name, value in knobs.items() if value is not None}
    limits = aw.Limits(**given) if given else None
    app = create_app(args.store, max_bytes=args.max_bytes, limits=limits)
    # Bind first, then announce the real port: callers that asked for port 0 read it here.
    # proto must say IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that do, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
