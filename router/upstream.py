"""Where a model's requests go: one address, whatever serves the model there.

A model record's upstream is one of three kinds, and the proxy speaks to all of them alike:
- a local child: 127.0.0.1 and the port its `ready` line (or the router) gave; set while it serves;
- a remote server (a preset section with `url =`): any OpenAI-compatible server, fixed;
- a peer's model: another modelyard router, which serves the model under its own name.

A remote server or a peer may want an API key (sent as a bearer token, never shown) and may know
the model under another name than the one the client used (`name@peer`, `use-model-name`): the
JSON body's `model` is then rewritten on the way.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

from router.errors import ConfigError

LOCAL_HOST = "127.0.0.1"  # children listen on loopback only
# The routers a request has passed through, each by its ROUTER_ID: `x-modelyard-via: id1,id2`.
# A request that came from another router is not sent on to a peer (peers that peer each other
# would bounce it); one that has seen this router already, or MAX_HOPS routers, is served by
# local models only (a remote section that names a router that names it back).
VIA_HEADER = b"x-modelyard-via"
ROUTER_ID = secrets.token_hex(6)
MAX_HOPS = 4


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    headers: tuple[tuple[bytes, bytes], ...] = ()  # added to every request (an API key)
    model_name: str | None = None  # the model's name there, when the client's may differ
    another_router: bool = False  # may be a modelyard router: requests carry x-modelyard-via

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def local_child(port: int) -> Upstream:
    return Upstream(LOCAL_HOST, port)


def bearer(api_key: str | None, where: str) -> tuple[tuple[bytes, bytes], ...]:
    """The Authorization header that sends `api_key`; a key that cannot be a header is refused."""
    if not api_key:
        return ()
    if not (api_key.isascii() and api_key.isprintable()):
        raise ConfigError(f"{where}: an API key must be printable ASCII (it is sent as an HTTP header)")
    return ((b"authorization", b"Bearer " + api_key.encode("ascii")),)


def parse_base_url(url: str, where: str) -> tuple[str, int]:
    """`http://host[:port][/]` as (host, port). No path (the routes are the OpenAI ones, from the
    root, as a client gives them) and no TLS: the router's client speaks plain HTTP, as between
    pods of one cluster; put a TLS-terminating proxy in front of a server outside it."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: {url!r} is not a URL: {exc}") from exc
    if parts.scheme != "http":
        raise ConfigError(f"{where}: {url!r}: only http:// URLs are supported (https needs a proxy in front)")
    if not parts.hostname:
        raise ConfigError(f"{where}: {url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: {url!r}: give the server's root (http://host:port), without a path")
    if parts.username or parts.password:
        raise ConfigError(f"{where}: {url!r}: put credentials in the api-key, not in the URL")
    return parts.hostname, port or 80


# What a remote server is reached on through this router: its inference routes. Not the rest of its
# API (files, keys, admin routes), which its api-key would open to every client of this router.
REMOTE_ROUTES = frozenset({
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions", "/completion",
    "/v1/embeddings", "/embeddings", "/embedding", "/v1/messages", "/v1/messages/count_tokens",
    "/v1/responses", "/responses", "/v1/rerank", "/rerank", "/v1/reranking", "/reranking", "/infill",
    "/tokenize", "/detokenize", "/apply-template", "/v1/audio/transcriptions", "/v1/streams/lookup",
    "/v1/stream",
})


_STREAM_BY_ID = re.compile(r"/v1/stream/[A-Za-z0-9_.:-]+")


def remote_may_serve(path: str) -> bool:
    """One of REMOTE_ROUTES exactly, or a stream by its id; never a path with `..` or escapes,
    which a server (or a proxy before it) might resolve to another route."""
    if "%" in path or "/." in path:
        return False
    return path in REMOTE_ROUTES or _STREAM_BY_ID.fullmatch(path) is not None


def via_of(headers: list[tuple[bytes, bytes]]) -> tuple[str, ...]:
    """The routers a request passed through (its x-modelyard-via), as sent."""
    value = next((v for k, v in headers if k == VIA_HEADER), b"")
    return tuple(part.strip() for part in value.decode("latin-1").split(",") if part.strip())


def via_for(headers: list[tuple[bytes, bytes]]) -> bytes:
    """x-modelyard-via for a request this router sends to another."""
    return ",".join([*via_of(headers)[:MAX_HOPS], ROUTER_ID]).encode("latin-1")


def query_for(upstream: Upstream, target: str, requested: str | None) -> str:
    """The target with `?model=` naming the model as the upstream knows it."""
    name = upstream.model_name
    path, mark, query = target.partition("?")
    if name is None or requested is None or name == requested or "model=" not in query:
        return target
    pairs = [(k, name if k == "model" and v == requested else v) for k, v in parse_qsl(query, keep_blank_values=True)]
    return path + mark + urlencode(pairs)


def body_for(upstream: Upstream, body: bytes, requested: str | None) -> bytes:
    """The request body as the upstream must see it: its own name for the model in a JSON body's
    `model` (when the client named it otherwise). Any other body goes as it came."""
    name = upstream.model_name
    if name is None or requested is None or name == requested:
        return body
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # a body nested too deep to parse: as it came
        return body
    if not isinstance(data, dict) or data.get("model") != requested:
        return body
    data["model"] = name
    return json.dumps(data, ensure_ascii=False).encode()
