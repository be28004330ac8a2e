"""A client for OCI distribution registries and Ollama's registry, on httpx (asyncio and trio).

The protocol is the distribution v2 API for single manifests (distribution-spec
``spec.md``, "Pulling manifests" and "Pulling blobs"), as Ollama's pull uses it
(``server/images.go`` ``pullModelManifest``):

    GET /v2/<namespace>/<model>/manifests/<tag>     Accept: the manifest media types
    GET /v2/<namespace>/<model>/blobs/<digest>      Range: bytes=<start>- to resume

A stock registry answers a manifest GET without ``Accept`` with 400, so it is always sent;
the manifest bytes are kept exactly as received. Registries may answer a blob GET with a
redirect to another host (a CDN): httpx drops the ``Authorization`` header on a redirect to
another origin, so no token leaves the registry. A ``401`` with ``WWW-Authenticate: Bearer
realm=…,service=…,scope=…`` is answered with an anonymous token request and one retry
(distribution ``docs/spec/auth/token.md``). Ollama's registry answers 412 to MLX tags unless
the client says it runs on macOS (ollama/ollama#15172); that is raised as
`PreconditionFailedError` with the registry's own message.

Manifest lists (``application/vnd.ollama.manifest.list.v2+json``, Ollama PR #16590, and the
docker/OCI index types) are resolved to the child whose ``runner`` is ``mlx`` (else whose
``format`` is ``safetensors``), fetched as a blob the way Ollama does, falling back to the
manifest endpoint that stock registries serve it from, and checked against its digest.
"""

from __future__ import annotations

import hashlib
import platform
import random
import re
import ssl
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import msgspec

from ._errors import (
    DigestMismatchError,
    ManifestError,
    PreconditionFailedError,
    RegistryAuthError,
    RegistryError,
    RegistryNotFoundError,
    RegistryServerError,
)
from ._version import __version__

__all__ = [
    "LIST_MEDIA_TYPES",
    "MANIFEST_ACCEPT",
    "OLLAMA_LIST_MEDIA_TYPE",
    "RegistryClient",
    "RemoteManifest",
    "registry_url",
]

OLLAMA_LIST_MEDIA_TYPE = "application/vnd.ollama.manifest.list.v2+json"
DOCKER_MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
LIST_MEDIA_TYPES = frozenset(
    {
        OLLAMA_LIST_MEDIA_TYPE,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    }
)
#: What a manifest GET accepts: Ollama's list first, as Ollama 0.40 asks (PR #16590).
MANIFEST_ACCEPT = ", ".join(
    [
        OLLAMA_LIST_MEDIA_TYPE,
        DOCKER_MANIFEST_MEDIA_TYPE,
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)
#: Statuses worth another attempt: the server is overloaded or restarting.
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_json_decoder = msgspec.json.Decoder()


def _user_agent() -> str:
    return f"asyncweights/{__version__} ({platform.machine()} {sys.platform})"


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The `ssl.SSLError` under an httpx transport error (httpx chains httpcore's, which
    chains the ``ssl`` module's), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def registry_url(host: str, scheme: str, registry: str | None, *, insecure: bool) -> str:
    """The base URL requests go to: `registry` if given, else the name's host.

    Plain HTTP is used only on explicit request: ``registry="http://…"``, a name spelled
    ``http://host/…``, or `insecure`. A `registry` without a scheme gets ``https://``.
    """
    if registry is None:
        base = f"{'http' if insecure or scheme == 'http' else 'https'}://{host}"
    elif "://" in registry:
        base = registry
    else:
        base = f"{'http' if insecure else 'https'}://{registry}"
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"registry URL must be http:// or https://, not {registry!r}")
    return base.rstrip("/")


@dataclass(frozen=True, slots=True)
class RemoteManifest:
    """A runnable manifest as the registry sent it, and the list it was chosen from, if any.

    Attributes:
        data: the manifest bytes, exactly as received.
        digest: ``sha256:<hex>`` of `data`.
        list_data: the manifest list's bytes when the tag named a list, else None.
        list_digest: ``sha256:<hex>`` of `list_data`.
        list_media_type: the list's media type.
    """

    data: bytes
    digest: str
    list_data: bytes | None = None
    list_digest: str | None = None
    list_media_type: str | None = None


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryClient:
    """One registry's HTTP client: auth token, retries with backoff, typed errors.

    Use as ``async with RegistryClient(url, …) as client``.

    Args:
        base_url: ``https://registry.ollama.ai``, ``http://127.0.0.1:5000`` …
        timeout: seconds to connect, or between two reads, before a request is retried.
        retries: attempts after the first for network errors and 429/5xx answers.
        model: the model name, for error messages.
        transport: an httpx transport (tests); None for httpx's own.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        model: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.model = model
        self._token: str | None = None
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": _user_agent()},
            transport=transport,
            follow_redirects=True,
            # Blobs are stored bytes; a registry must not re-encode them in transit.
            trust_env=False,
        )

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._client.aclose()

    def _error(
        self,
        cls: type[RegistryError],
        reason: str,
        repository: str | None,
        *,
        status: int | None = None,
        digest: str | None = None,
    ) -> RegistryError:
        return cls(
            reason,
            registry=self.base_url,
            repository=repository,
            status=status,
            model=self.model,
            digest=digest,
        )

    async def _send(
        self,
        url: str,
        repository: str,
        *,
        headers: Mapping[str, str],
        digest: str | None = None,
    ) -> httpx.Response:
        """GET `url` as a stream: retries, one bearer-token round, typed errors.

        The caller closes the response it gets (status < 400).
        """
        attempt = 0
        authenticated = False
        while True:
            sent = dict(headers)
            if self._token is not None:
                sent["Authorization"] = f"Bearer {self._token}"
            request = self._client.build_request("GET", url, headers=sent)
            try:
                response = await self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                tls = _tls_error(exc)
                if tls is not None:
                    # A handshake that failed fails again: no retry. The usual cause is a
                    # plain-HTTP registry named without a scheme (https:// is the default).
                    raise self._error(
                        RegistryError,
                        f"TLS handshake failed: {tls}; a registry that speaks plain HTTP is"
                        " given as http://host:port (or insecure=True, CLI --insecure)",
                        repository,
                        digest=digest,
                    ) from exc
                if attempt >= self.retries:
                    raise self._error(
                        RegistryError,
                        f"request failed after {attempt + 1} attempts: "
                        f"{type(exc).__name__}: {exc or 'no detail'}",
                        repository,
                        digest=digest,
                    ) from exc
                await anyio.sleep(backoff(attempt))
                attempt += 1
                continue
            status = response.status_code
            if status == 401 and not authenticated:
                challenge = response.headers.get("www-authenticate", "")
                authenticated = True
                if challenge.lower().startswith("bearer "):
                    await response.aclose()
                    self._token = await self._fetch_token(challenge, repository)
                    continue
            elif status in _RETRY_STATUSES and attempt < self.retries:
                await response.aclose()
                await anyio.sleep(backoff(attempt))
                attempt += 1
                continue
            if status < 400:
                return response
            raise await self._status_error(response, repository, digest)

    async def _status_error(
        self, response: httpx.Response, repository: str, digest: str | None
    ) -> RegistryError:
        try:
            body = await response.aread()
        except httpx.HTTPError:
            body = b""
        finally:
            await response.aclose()
        status = response.status_code
        what = f"blob {digest}" if digest else "manifest"
        reason = f"HTTP {status} {response.reason_phrase} for the {what}"
        detail = _error_detail(body)
        if detail:
            reason += f": {detail}"
        cls: type[RegistryError]
        if status in (401, 403):
            cls = RegistryAuthError
        elif status == 404:
            cls = RegistryNotFoundError
        elif status == 412:
            cls = PreconditionFailedError
        elif status >= 500 or status == 429:
            cls = RegistryServerError
        else:
            cls = RegistryError
        return self._error(cls, reason, repository, status=status, digest=digest)

    async def _fetch_token(self, challenge: str, repository: str) -> str:
        """Answer a Bearer challenge with an anonymous token request (token.md)."""
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.pop("realm", None)
        if not realm:
            raise self._error(
                RegistryAuthError, f"unusable auth challenge {challenge!r}", repository
            )
        params.setdefault("scope", f"repository:{repository}:pull")
        try:
            response = await self._client.get(realm, params=params)
        except httpx.TransportError as exc:
            raise self._error(
                RegistryAuthError, f"token request to {realm} failed: {exc}", repository
            ) from exc
        if response.status_code != 200:
            detail = _error_detail(response.content)
            raise self._error(
                RegistryAuthError,
                f"token request to {realm} answered HTTP {response.status_code}"
                + (f": {detail}" if detail else ""),
                repository,
                status=response.status_code,
            )
        try:
            doc = _json_decoder.decode(response.content)
        except msgspec.DecodeError:
            doc = None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise self._error(
                RegistryAuthError, f"token response from {realm} has no token", repository
            )
        return token

    async def _read(
        self, url: str, repository: str, *, headers: Mapping[str, str], digest: str | None
    ) -> httpx.Response:
        response = await self._send(url, repository, headers=headers, digest=digest)
        try:
            await response.aread()
        except httpx.TransportError as exc:
            raise self._error(
                RegistryError, f"response broke off: {exc}", repository, digest=digest
            ) from exc
        finally:
            await response.aclose()
        return response

    async def manifest(self, repository: str, reference: str) -> RemoteManifest:
        """Fetch the manifest of ``repository:reference``, resolving a list to its MLX child.

        Raises:
            RegistryError: a subclass per HTTP failure. ManifestError: a list with no MLX
            child, or a body that is not JSON. DigestMismatchError: a child whose bytes do not
            match its digest.
        """
        url = f"{self.base_url}/v2/{repository}/manifests/{reference}"
        response = await self._read(
            url, repository, headers={"Accept": MANIFEST_ACCEPT}, digest=None
        )
        data = response.content
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        try:
            doc = _json_decoder.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(
                f"registry {self.base_url} sent a manifest that is not JSON: {exc}",
                model=self.model,
            ) from None
        if not isinstance(doc, dict):
            raise ManifestError(
                f"registry {self.base_url} sent a manifest that is not an object", model=self.model
            )
        media_type = doc.get("mediaType") or media_type
        if media_type not in LIST_MEDIA_TYPES and "manifests" not in doc:
            return RemoteManifest(data, _digest(data))
        child, child_digest = await self._resolve_list(repository, doc)
        return RemoteManifest(child, child_digest, data, _digest(data), media_type)

    async def _resolve_list(self, repository: str, doc: dict[str, Any]) -> tuple[bytes, str]:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise ManifestError("manifest list without 'manifests'", model=self.model)
        entries = [c for c in children if isinstance(c, dict)]
        pick = next((c for c in entries if c.get("runner") == "mlx"), None)
        pick = pick or next((c for c in entries if c.get("format") == "safetensors"), None)
        if pick is None:
            runners = ", ".join(str(c.get("runner") or c.get("format") or "?") for c in entries)
            raise ManifestError(
                f"no compatible manifest in the list (runners: {runners or 'none'})",
                model=self.model,
            )
        if "layers" in pick:  # an inline child: its identity is its canonical encoding
            data = msgspec.json.encode(pick)
            return data, _digest(data)
        digest = pick.get("digest")
        if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ManifestError(f"list child with invalid digest {digest!r}", model=self.model)
        try:  # Ollama fetches children as blobs; stock registries serve them as manifests
            url = f"{self.base_url}/v2/{repository}/blobs/{digest}"
            response = await self._read(url, repository, headers={}, digest=digest)
        except RegistryNotFoundError:
            url = f"{self.base_url}/v2/{repository}/manifests/{digest}"
            response = await self._read(
                url, repository, headers={"Accept": MANIFEST_ACCEPT}, digest=digest
            )
        data = response.content
        if _digest(data) != digest:
            raise DigestMismatchError(
                f"the list's manifest from registry {self.base_url} has sha256 {_digest(data)}",
                model=self.model,
                digest=digest,
            )
        return data, digest

    @asynccontextmanager
    async def blob(
        self, repository: str, digest: str, *, start: int = 0, end: int | None = None
    ) -> AsyncIterator[httpx.Response]:
        """Open a blob's bytes from `start` (to `end`, exclusive) as a streamed response.

        The response is 206 when the registry honoured the range, else 200 with the whole
        blob (the caller then restarts from 0). Redirects are followed; the token is not
        sent to another host.
        """
        headers = {}
        if start or end is not None:
            last = "" if end is None else str(end - 1)
            headers["Range"] = f"bytes={start}-{last}"
        url = f"{self.base_url}/v2/{repository}/blobs/{digest}"
        response = await self._send(url, repository, headers=headers, digest=digest)
        try:
            yield response
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    def broken(self, reason: str, repository: str, digest: str) -> RegistryError:
        """The error for a blob download that broke off through every retry."""
        return self._error(RegistryError, reason, repository, digest=digest)


def backoff(attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1``: 0.1 s doubling, capped at 5 s, jittered."""
    return float(min(5.0, 0.1 * 2.0**attempt) * (0.5 + random.random() / 2))


def _error_detail(body: bytes) -> str:
    """The registry's message: distribution's ``errors[].message``, Ollama's ``error``."""
    try:
        doc = _json_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        text = body[:200].decode("utf-8", "replace").strip()
        return text
    if isinstance(doc, dict):
        errors = doc.get("errors")
        if isinstance(errors, list):
            messages = [
                str(e.get("message") or e.get("code") or "") for e in errors if isinstance(e, dict)
            ]
            return "; ".join(m for m in messages if m)
        if isinstance(doc.get("error"), str):
            return str(doc["error"])
    return ""
