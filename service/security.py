"""Who may do what: API keys with scopes, allowed Host headers, and no cross-site simple POSTs.

One check runs before any route (the fast lane included): `Guard.check(scope)` returns the
caller (the key's name, or None for anonymous) or raises a ServeError that answers the request.

- Health routes never need a key.
- Without a keys file, inference, metadata and metrics are open (as Triton's); model control and
  jobs are refused, saying how to enable them (`--api-keys-file`, or `--unsafe-anonymous-admin`
  for local development).
- With a keys file (`{"keys": [{"name": ..., "sha256": ... | "key": ..., "scopes": [...]}]}`,
  reloaded when it changes), every other route needs `Authorization: Bearer <key>` with the
  route's scope: 401 without a key, 403 with one lacking the scope - except the scopes named in
  `anonymous_scopes` (of infer, read, metrics), which stay open. Keys are compared as SHA-256
  digests in constant time; only the key's name is ever logged or stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import BadRequest, Forbidden, ServeError
from service.routes import infer_route

log = logging.getLogger(__name__)

SCOPES = ("infer", "read", "jobs", "admin", "metrics")
#: Scopes open to anonymous callers when no keys file is configured.
ANONYMOUS = frozenset({"infer", "read", "metrics"})
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
RELOAD_CHECK_S = 1.0

_PUBLIC = frozenset({"/v2/health/live", "/v2/health/ready"})
#: What a cross-site form or fetch() may send without a CORS preflight ("" = no body).
_SIMPLE_CONTENT_TYPES = frozenset(
    {b"", b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data"}
)
_ADMIN = re.compile(r"^/v2/repository/models/[^/]+/(load|unload)$")


class Unauthorized(ServeError):
    """No key, or a key that is not known (401, with the Bearer challenge)."""

    status, reason = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


def required_scope(method: str, path: str) -> str | None:
    """The scope a route needs (None: none, e.g. health)."""
    if path in _PUBLIC:
        return None
    if method == "POST" and infer_route(path):
        return "infer"
    if _ADMIN.match(path):
        return "admin"
    if path == "/v1/jobs" or path.startswith("/v1/jobs/"):
        return "jobs"
    if path == "/metrics":
        return "metrics"
    return "read"


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a key's name (None: anonymous) and whether it may see every job."""

    name: str | None
    admin: bool


ANONYMOUS_CALLER = Caller(None, admin=False)


@dataclass(frozen=True)
class Key:
    """One configured key: its name, SHA-256 digest and scopes."""

    name: str
    digest: bytes
    scopes: frozenset[str]


def parse_keys(doc: Any) -> list[Key]:
    """The keys of a keys-file document; ValueError naming what is wrong."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('a keys file is {"keys": [{"name": ..., "sha256": ..., "scopes": [...]}]}')
    keys = []
    for i, entry in enumerate(doc["keys"]):
        where = f"keys[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{where}: needs a 'name'")
        scopes = entry.get("scopes")
        if not isinstance(scopes, list) or not scopes or set(scopes) - set(SCOPES):
            raise ValueError(f"{where}.scopes: a non-empty list of {', '.join(SCOPES)}")
        if isinstance(entry.get("sha256"), str):
            try:
                digest = bytes.fromhex(entry["sha256"])
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"{where}.sha256: 64 hexadecimal digits")
        elif isinstance(entry.get("key"), str) and len(entry["key"]) >= 16:
            digest = hashlib.sha256(entry["key"].encode()).digest()
        else:
            raise ValueError(f"{where}: needs 'sha256' (preferred) or a 'key' of 16+ characters")
        keys.append(Key(entry["name"], digest, frozenset(scopes)))
    return keys


class KeyStore:
    """The keys file, re-read when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._keys: list[Key] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if force:
                raise ValueError(f"keys file {self.path}: {exc.strerror}") from None
            log.error("keys file %s: %s; keeping the keys loaded before", self.path, exc.strerror)
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            keys = parse_keys(json.loads(self.path.read_bytes()))
        except (OSError, ValueError) as exc:
            if force:
                raise ValueError(f"keys file {self.path}: {exc}") from None
            log.error(
                "keys file %s is invalid (%s); keeping the keys loaded before", self.path, exc
            )
            return
        self._keys, self._stamp = keys, stamp
        log.info("keys file %s: %d keys", self.path, len(keys))

    def find(self, presented: str) -> Key | None:
        """The key whose digest matches, comparing with every key in constant time."""
        self._refresh()
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key in self._keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found


def _host_name(host: str) -> str:
    """`example.com:8000` -> `example.com`; `[::1]:8000` -> `::1`."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def default_allowed_hosts(bind_host: str) -> list[str]:
    """The loopback names when the server is bound to loopback; any host otherwise."""
    if bind_host in LOOPBACK_HOSTS or bind_host.startswith("127."):
        return [*LOOPBACK_HOSTS, bind_host]
    return ["*"]


class Guard:
    """The check every request passes before any route."""

    def __init__(
        self,
        keys_file: Path | None,
        allowed_hosts: list[str],
        unsafe_anonymous_admin: bool = False,
        anonymous_scopes: list[str] | None = None,
    ) -> None:
        self.keys = KeyStore(keys_file) if keys_file else None
        if anonymous_scopes is None:
            anonymous_scopes = [] if keys_file else sorted(ANONYMOUS)
        unknown = set(anonymous_scopes) - ANONYMOUS
        if unknown:
            raise ValueError(f"anonymous scopes may be {sorted(ANONYMOUS)}, not {sorted(unknown)}")
        self.anonymous = frozenset(anonymous_scopes)
        self.any_host = "*" in allowed_hosts
        self.hosts = frozenset(h.lower() for h in allowed_hosts)
        self.unsafe_anonymous_admin = unsafe_anonymous_admin

    def check(self, scope: MutableMapping[str, Any]) -> Caller:
        """Who the caller is; raises the refusal (400/401/403) otherwise."""
        method = scope["method"]
        return self.check_request(method, required_scope(method, scope["path"]), scope["headers"])

    def check_request(
        self, method: str, needed: str | None, headers: list[tuple[bytes, bytes]]
    ) -> Caller:
        """`check` for a request needing the scope `needed` (None: none), from its method and
        headers (lower-case names, raw values)."""
        host = authorization = origin = content_type = None
        for name, value in headers:
            if name == b"host":
                host = value
            elif name == b"authorization":
                authorization = value
            elif name == b"origin":
                origin = value
            elif name == b"content-type":
                content_type = value
        if not self.any_host:
            self._check_host(host, origin)
        if needed is None:
            return ANONYMOUS_CALLER
        caller = self.authenticate(authorization, needed)
        if method == "POST" and needed in ("admin", "jobs"):  # the only simple method of these
            self._check_not_cross_site(authorization, content_type)
        return caller

    def _check_host(self, host: bytes | None, origin: bytes | None) -> None:
        name = _host_name(host.decode("latin-1")).lower() if host else ""
        if name not in self.hosts:
            raise BadRequest(
                f"Host header {name or '(none)'!r} is not allowed here (--allowed-hosts); "
                "this guards against DNS rebinding"
            )
        if origin is not None and origin != b"null":
            text = origin.decode("latin-1")
            origin_host = _host_name(text.split("://", 1)[-1]).lower()
            if origin_host not in self.hosts:
                raise Forbidden(f"cross-origin requests from {text!r} are not allowed")

    def authenticate(self, authorization: bytes | None, needed: str) -> Caller:
        """The caller presenting `authorization` (an `Authorization` header's value, or gRPC's
        `authorization` metadata) for a route needing `needed`; raises 401/403 otherwise."""
        if authorization is None and needed in self.anonymous:
            return ANONYMOUS_CALLER
        if self.keys is None:
            if self.unsafe_anonymous_admin:
                return Caller(None, admin=True)
            what = "model control" if needed == "admin" else "batch-scoring jobs"
            raise Forbidden(
                f"{what} needs an API key with the '{needed}' scope: start the server with "
                "--api-keys-file (or, for local development only, --unsafe-anonymous-admin)"
            )
        if authorization is None:
            raise Unauthorized(f"this route needs an API key with the '{needed}' scope")
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send the key as 'Authorization: Bearer <key>'")
        key = self.keys.find(token.strip())
        if key is None:
            raise Unauthorized("unknown API key")
        admin = "admin" in key.scopes
        if needed not in key.scopes and not (needed == "jobs" and admin):
            raise Forbidden(f"key '{key.name}' lacks the '{needed}' scope")
        return Caller(key.name, admin)

    @staticmethod
    def _check_not_cross_site(authorization: bytes | None, content_type: bytes | None) -> None:
        """A browser sends a cross-site POST without a preflight only as a 'simple' request: no
        Authorization header, and no content type or a form / text one. Refuse those."""
        if authorization is not None:
            return
        media = (content_type or b"").split(b";", 1)[0].strip().lower()
        if media in _SIMPLE_CONTENT_TYPES:
            raise BadRequest(
                "a request that changes the server needs a JSON body "
                "(Content-Type: application/json) or an Authorization header"
            )


access = logging.getLogger("onnxserve.access")


def log_access(scope: MutableMapping[str, Any], status: int, caller: Caller | None) -> None:
    """One access-log line: client, request, status and the key's name (never the key)."""
    client = scope.get("client") or ("-", 0)
    name = caller.name if caller is not None and caller.name else "-"
    access.info(
        '%s:%s "%s %s" %d key=%s',
        client[0],
        client[1],
        scope["method"],
        scope["path"],
        status,
        name,
    )


def logged(scope: MutableMapping[str, Any], send: Any, caller: Caller) -> Any:
    """`send`, logging the request once its response starts."""

    async def send_logged(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            log_access(scope, message["status"], caller)
        await send(message)

    return send_logged
