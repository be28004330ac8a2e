"""_registry's own rules, through httpx's in-process MockTransport (no socket at all).

Base-URL building, the manifest ``Accept`` header, the Bearer challenge answer
(distribution ``docs/spec/auth/token.md``), the error body parsing and the HTTP status to
error type mapping. Whole pulls against a real registry are in test_pull.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import httpx
import pytest

import asyncweights as aw
from asyncweights._registry import (
    MANIFEST_ACCEPT,
    RegistryClient,
    RemoteManifest,
    _error_detail,
    backoff,
    registry_url,
)

BASE = "https://reg.test"
MANIFEST = json.dumps({"schemaVersion": 2, "layers": []}).encode()

Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, *, retries: int = 0) -> RegistryClient:
    return RegistryClient(
        BASE, retries=retries, model="m:latest", transport=httpx.MockTransport(handler)
    )


@pytest.mark.parametrize(
    ("host", "scheme", "registry", "insecure", "url"),
    [
        ("registry.ollama.ai", "https", None, False, "https://registry.ollama.ai"),
        ("localhost:5000", "https", None, True, "http://localhost:5000"),
        ("localhost:5000", "http", None, False, "http://localhost:5000"),
        ("ignored", "https", "mirror.test:8443", False, "https://mirror.test:8443"),
        ("ignored", "https", "mirror.test", True, "http://mirror.test"),
        ("ignored", "https", "http://mirror.test/", False, "http://mirror.test"),
        ("ignored", "http", "https://mirror.test/v/", True, "https://mirror.test/v"),
    ],
)
def test_registry_url_uses_http_only_when_asked(
    host: str, scheme: str, registry: str | None, insecure: bool, url: str
) -> None:
    assert registry_url(host, scheme, registry, insecure=insecure) == url


def test_registry_url_refuses_other_schemes() -> None:
    with pytest.raises(
        ValueError, match=r"^registry URL must be http:// or https://, not 'ftp://x'$"
    ):
        registry_url("h", "https", "ftp://x", insecure=False)


def test_manifest_accept_lists_ollamas_list_type_first() -> None:
    assert MANIFEST_ACCEPT.split(", ") == [
        "application/vnd.ollama.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    ]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (
            b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}',
            "manifest unknown",
        ),
        (b'{"errors":[{"code":"DENIED"},{"message":"m2"},{"message":""}]}', "DENIED; m2"),
        (b'{"error":"pull model manifest: 412"}', "pull model manifest: 412"),
        (b'{"error":3}', ""),
        (b"[1, 2]", ""),
        (b"  plain text\n", "plain text"),
        (b"x" * 300, "x" * 200),
        (b"\xff\xfe", "\ufffd\ufffd"),
        (b"", ""),
    ],
)
def test_error_detail_reads_distribution_and_ollama_bodies(body: bytes, detail: str) -> None:
    assert _error_detail(body) == detail


@pytest.mark.parametrize("attempt", [0, 1, 3, 6, 20])
def test_backoff_doubles_from_a_tenth_of_a_second_capped_at_five_with_jitter(
    attempt: int,
) -> None:
    full = min(5.0, 0.1 * 2.0**attempt)
    for _ in range(50):
        assert full / 2 <= backoff(attempt) <= full


async def test_manifest_get_sends_accept_and_digests_the_exact_bytes() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=MANIFEST)

    async with client(handler) as c:
        got = await c.manifest("library/qwen3", "8b")
    assert got == RemoteManifest(MANIFEST, "sha256:" + hashlib.sha256(MANIFEST).hexdigest())
    assert [str(r.url) for r in seen] == [f"{BASE}/v2/library/qwen3/manifests/8b"]
    assert seen[0].headers["accept"] == MANIFEST_ACCEPT
    assert seen[0].headers["user-agent"].startswith(f"asyncweights/{aw.__version__} (")
    assert "authorization" not in seen[0].headers


async def test_bearer_challenge_is_answered_with_an_anonymous_token_then_one_retry() -> None:
    seen: list[tuple[str, dict[str, str], str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(
            (request.url.path, dict(request.url.params), request.headers.get("authorization"))
        )
        if request.url.host == "auth.test":
            return httpx.Response(200, json={"access_token": "tok-1"})
        if request.headers.get("authorization") != "Bearer tok-1":
            challenge = 'Bearer realm="https://auth.test/token",service="reg.test"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return httpx.Response(200, content=MANIFEST)

    async with client(handler) as c:
        got = await c.manifest("library/qwen3", "8b")
        assert got.data == MANIFEST
        await c.manifest("library/qwen3", "9b")  # the token is kept: no second challenge
    assert seen == [
        ("/v2/library/qwen3/manifests/8b", {}, None),
        ("/token", {"service": "reg.test", "scope": "repository:library/qwen3:pull"}, None),
        ("/v2/library/qwen3/manifests/8b", {}, "Bearer tok-1"),
        ("/v2/library/qwen3/manifests/9b", {}, "Bearer tok-1"),
    ]


async def test_challenge_scope_given_by_the_registry_is_kept() -> None:
    scopes: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            scopes.append(request.url.params["scope"])
            return httpx.Response(200, json={"token": "t"})
        if "authorization" not in request.headers:
            challenge = 'Bearer realm="https://auth.test/t",scope="repository:x/y:pull,push"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return httpx.Response(200, content=MANIFEST)

    async with client(handler) as c:
        await c.manifest("x/y", "latest")
    assert scopes == ["repository:x/y:pull,push"]


@pytest.mark.parametrize(
    ("challenge", "token_reply", "reason"),
    [
        (
            'Bearer service="reg.test"',
            None,
            "unusable auth challenge 'Bearer service=\"reg.test\"'",
        ),
        (
            'Bearer realm="https://auth.test/t"',
            httpx.Response(403, json={"errors": [{"message": "no anonymous pulls"}]}),
            "token request to https://auth.test/t answered HTTP 403: no anonymous pulls",
        ),
        (
            'Bearer realm="https://auth.test/t"',
            httpx.Response(200, json={"token": ""}),
            "token response from https://auth.test/t has no token",
        ),
        (
            'Bearer realm="https://auth.test/t"',
            httpx.Response(200, content=b"not json"),
            "token response from https://auth.test/t has no token",
        ),
    ],
)
async def test_unusable_challenge_or_token_reply_is_a_registry_auth_error(
    challenge: str, token_reply: httpx.Response | None, reason: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            assert token_reply is not None
            return token_reply
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    async with client(handler) as c:
        with pytest.raises(aw.RegistryAuthError) as caught:
            await c.manifest("library/qwen3", "8b")
    err = caught.value
    assert type(err) is aw.RegistryAuthError
    assert str(err).startswith(reason), str(err)
    assert (err.registry, err.repository, err.model) == (BASE, "library/qwen3", "m:latest")


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (401, aw.RegistryAuthError),  # no Bearer challenge to answer
        (403, aw.RegistryAuthError),
        (404, aw.RegistryNotFoundError),
        (412, aw.PreconditionFailedError),
        (429, aw.RegistryServerError),
        (500, aw.RegistryServerError),
        (503, aw.RegistryServerError),
        (400, aw.RegistryError),
        (418, aw.RegistryError),
    ],
)
async def test_http_status_maps_to_one_error_type_with_the_registrys_message(
    status: int, cls: type[aw.RegistryError]
) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(status, json={"errors": [{"message": "said so"}]})

    digest = "sha256:" + "ab" * 32
    async with client(handler) as c:
        with pytest.raises(aw.RegistryError) as caught:
            async with c.blob("library/qwen3", digest, start=0):
                pass
    err = caught.value
    assert type(err) is cls
    assert err.status == status
    assert err.digest == digest
    phrase = httpx.codes.get_reason_phrase(status)
    assert str(err).startswith(f"HTTP {status} {phrase} for the blob {digest}: said so"), str(err)
    assert calls == [f"/v2/library/qwen3/blobs/{digest}"]  # retries=0: one request


async def test_retryable_status_is_retried_then_succeeds() -> None:
    statuses = iter([503, 429, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(statuses), content=MANIFEST)

    async with client(handler, retries=2) as c:
        got = await c.manifest("a/b", "c")
    assert got.data == MANIFEST
    assert next(statuses, None) is None


@pytest.mark.parametrize(
    ("start", "end", "range_header"),
    [(0, None, None), (5, None, "bytes=5-"), (0, 10, "bytes=0-9"), (3, 4, "bytes=3-3")],
)
async def test_blob_range_header_is_inclusive_of_its_last_byte(
    start: int, end: int | None, range_header: str | None
) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("range"))
        return httpx.Response(206, content=b"x")

    async with client(handler) as c, c.blob("a/b", "sha256:" + "0" * 64, start=start, end=end) as r:
        assert r.status_code == 206
    assert seen == [range_header]
