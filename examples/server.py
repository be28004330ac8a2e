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

What a client cannot do: name a file. ``"model"`` is a model name in Ollama's grammar, never
a path (anything else is a 400 before any file is opened); error messages never carry a
path of the server. Bodies over `MAX_BODY` are refused with 413, malformed or too deeply
nested JSON with 400; once an event stream has started, any failure is one
``{"error": ...}`` event, then the stream ends cleanly.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import math
import os
import re
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import asyncweights as aw

STORE_ENV = "ASYNCWEIGHTS_STORE"
#: the largest request body accepted (413 above): a request is a few hundred bytes
MAX_BODY = 64 * 1024
logger = logging.getLogger("asyncweights.server")


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


class BadRequest(Exception):
    """A request refused before any work: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> Response:
        return JSONResponse({"error": self.message}, status_code=self.status)


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object, read within `MAX_BODY` bytes.

    Raises:
        BadRequest: 413 for a body over `MAX_BODY` bytes (before reading it when the
            Content-Length says so); 400 for a body that is not a JSON object (malformed,
            not UTF-8, nested too deeply: the standard library's parser raises RecursionError
            long before `MAX_BODY` bytes of brackets run out).
    """
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise BadRequest(413, f"the request body is over {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise BadRequest(413, f"the request body is over {MAX_BODY} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except RecursionError:
        raise BadRequest(400, "the body is JSON nested too deeply") from None
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError
        raise BadRequest(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "the body must be a JSON object")
    return body


def model_name(value: object) -> str:
    """A model name from a client: a string in Ollama's name grammar, never a path.

    Raises:
        BadRequest: 400 for anything else (a path, a URL, a NUL, a number).
    """
    if not isinstance(value, str):
        raise BadRequest(400, '"model" must be a model name (a string)')
    try:
        aw.ModelName.parse(value)
    except aw.InvalidNameError as exc:
        raise BadRequest(400, exc.reason) from None
    return value


def public_error(exc: aw.AsyncWeightsError) -> str:
    """An error's message for a client: its reason and the model, tensor, blob and errno
    it names, with no file of the server (no path field, absolute paths in the reason
    replaced by ``<path>``)."""
    where = []
    if exc.model is not None:
        where.append(f"model {exc.model!r}")
    if exc.tensor is not None:
        where.append(f"tensor {exc.tensor!r}")
    if exc.digest is not None:
        where.append(f"blob {exc.digest}")
    if exc.errno is not None:
        where.append(f"errno {errno.errorcode.get(exc.errno, exc.errno)}")
    text = f"{exc.reason} ({', '.join(where)})" if where else exc.reason
    return _ABSOLUTE_PATH.sub("<path>", text)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:%@/-])/[^\s'\",)]*")


async def load(request: Request) -> Response:
    cache: aw.WeightCache = request.app.state.cache
    try:
        body = await read_json(request)
        model = model_name(body.get("model"))
        component = body.get("component")
        if not isinstance(component, str | None) or (component and not component.isprintable()):
            raise BadRequest(400, '"component" must be a string or null')
    except BadRequest as bad:
        return bad.response()

    async def events() -> AsyncIterator[str]:
        # Holds the cache's waiter slot while the client is connected: a disconnect cancels
        # this generator, which leaves the load (cancelling it if no one else waits).
        # Once the stream has started, every failure is one error event, then the end.
        try:
            async with cache.progress(model, component) as progress:
                async for event in progress:
                    yield _sse(event.to_ollama())
        except aw.AsyncWeightsError as exc:
            yield _sse({"error": public_error(exc)})
        except Exception:
            logger.exception("load of %r failed", model)
            yield _sse({"error": "internal error"})

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


async def pull(request: Request) -> Response:
    cache: aw.WeightCache = request.app.state.cache
    try:
        body = await read_json(request)
        model = model_name(body.get("model"))
    except BadRequest as bad:
        return bad.response()
    registry = body.get("registry")
    insecure = body.get("insecure", False)
    if not isinstance(registry, str | None) or not isinstance(insecure, bool):
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
                await send.send({"error": public_error(exc)})
            except Exception:
                logger.exception("pull of %r failed", model)
                await send.send({"error": "internal error"})

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
        return JSONResponse({"error": public_error(exc)}, status_code=400)
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


def _entry(entry: aw.CacheEntry) -> dict[str, Any]:
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
    # Listen before announcing: a client that connects while uvicorn still starts waits in
    # the backlog instead of being refused.
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
