"""Peer routers: other modelyard routers whose models this router serves too.

Each peer's models appear here as `name@peer` (source "peer"), so that no peer's model can take
another's or a local model's name; a request for plain `name` goes to any replica of it, local or
on a peer (router/replica_relay.py). Their statuses are the peer's own, mirrored from its
/models/sse feed; the peer loads and unloads its models itself (a load here is forwarded there).

A peer given by an IP address is one peer, named `name=` or `ip:port`. A peer given by a host
name is every address the name resolves to (a Kubernetes headless Service lists its pods so), each
named `ip:port`, looked up again every --peers-resolve-seconds: a new address becomes a peer, one
gone takes its models with it.

A feed that breaks, stays silent, or sends what is not its JSON turns the peer's models
`unloaded`, with the reason, until it comes back; it is reconnected with backoff (0.5 s, doubling
to 10 s). What a peer sends is bounded: lines of at most MAX_LINE_BYTES, at most MAX_MODELS models.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import socket
import time
from typing import Any

from router.errors import ConfigError, PeerAnswered
from router.model_record import ModelRecord
from router.model_sources import SOURCE_PEER, ModelSpec
from router.model_status import ModelStatus
from router.presets import load_preset_file
from router.registry import Registry
from router.settings import RouterSettings
from router.upstream import Upstream, bearer, parse_base_url
from router.upstream_client import UpstreamError, UpstreamResponse

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
FEED_SILENCE_S = 60.0  # a peer pings its feed every 15 s by default: silence beyond this is a dead peer
REQUEST_TIMEOUT_S = 10.0
MAX_LINE_BYTES = 1024 * 1024  # one line, or one event, of the feed
MAX_LIST_BYTES = 16 * 1024 * 1024  # the peer's /models
MAX_MODELS = 4096
MAX_NAME_CHARS = 256
MAX_CONTROL_ANSWER_BYTES = 64 * 1024  # the peer's answer to a load or unload
MAX_ENTRY_BYTES = 64 * 1024  # what is kept of a peer's /models entry for one model
# What is kept of a peer's entry, shown in this router's /models: the facts, not the peer's own
# bookkeeping (its status, in-flight count, source are this router's to say).
ENTRY_KEYS = ("object", "owned_by", "created", "architecture", "meta", "memory", "tags", "can_remove")
RECHECK_INTERVAL_S = 1.0  # the list is taken again, or a feed reopened on request, at most this often
STABLE_FEED_S = 5.0  # a feed followed this long, then ended, is reopened at once
STATUSES = {str(status): status for status in ModelStatus}


class PeerFeedBroken(Exception):
    """The peer's feed cannot be followed: it is reconnected."""


def peers_of(settings: RouterSettings) -> list[str]:
    """--peers, then a preset's router-wide `peers =`."""
    given = list(settings.peers)
    if settings.models_preset:
        preset = load_preset_file(settings.models_preset)
        value = preset.global_section.router_options.get("peers", "")
        given += [p.strip() for p in value.split(",") if p.strip()]
    return given


def parse_peer(text: str) -> tuple[str | None, str, int]:
    """`URL` or `name=URL` as (name, host, port)."""
    name, equals, url = text.partition("=")
    if not equals or "://" in name:
        name, url = "", text
    if name and ("@" in name or "/" in name or not name.strip()):
        raise ConfigError(f"--peers {text!r}: a peer's name may not hold '@' or '/'")
    host, port = parse_base_url(url, f"--peers {text!r}")
    return (name.strip() or None), host, port


def _acceptable_name(name: object) -> bool:
    """A peer's model name this router takes: text of at most MAX_NAME_CHARS, without control
    characters (it goes into logs and ids)."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS and name.isprintable()


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _peer_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Peers:
    def __init__(self, registry: Registry, settings: RouterSettings) -> None:
        self.registry = registry
        self.settings = settings
        key = settings.peers_api_key or (settings.api_keys[0] if settings.api_keys else None)
        self.headers = bearer(key, "--peers-api-key")
        self.given = [parse_peer(text) for text in peers_of(settings)]
        named = [name or (_peer_name(host, port) if _is_address(host) else f"{host}:{port}")
                 for name, host, port in self.given]
        if len(set(named)) != len(named):
            twice = sorted({n for n in named if named.count(n) > 1})
            raise ConfigError(f"--peers: {', '.join(twice)} given twice (each peer needs a name of its own)")
        self.links: dict[str, PeerLink] = {}
        self._tasks: list[asyncio.Task[None]] = []
        registry.on_unreachable = self._on_unreachable

    def start(self) -> None:
        for name, host, port in self.given:
            if _is_address(host):
                self._link(name or _peer_name(host, port), host, port)
            else:
                self._tasks.append(asyncio.create_task(self._follow_dns(host, port), name=f"peers-dns-{host}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for link in list(self.links.values()):
            await link.stop()

    def _link(self, name: str, host: str, port: int) -> bool:
        """Follow a new peer; False when a peer of that name is followed already."""
        if name in self.links:
            log.warning("peers: %s is already a peer; %s:%d is not followed a second time", name, host, port)
            return False
        link = self.links[name] = PeerLink(self.registry, name, Upstream(host, port, self.headers))
        link.start()
        return True

    async def _follow_dns(self, host: str, port: int) -> None:
        """Every address of the name is a peer; looked up again and again."""
        loop = asyncio.get_running_loop()
        mine: set[str] = set()
        while True:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                addresses = {str(info[4][0]) for info in infos}
            except OSError as exc:
                log.warning("peers: cannot resolve %s: %s (keeping the %d peers it had)", host, exc, len(mine))
            else:
                current = {_peer_name(address, port): address for address in addresses}
                for name, address in current.items():
                    if name not in mine and name not in self.links:
                        log.info("peers: %s resolves to %s: a peer", host, name)
                        if self._link(name, address, port):
                            mine.add(name)
                for name in mine - set(current):
                    log.info("peers: %s no longer resolves to %s: its models go", host, name)
                    link = self.links.pop(name, None)
                    if link is not None:
                        await link.stop()
                mine &= set(current)
            await asyncio.sleep(self.settings.peers_resolve_s)

    def _on_unreachable(self, record: ModelRecord) -> None:
        link = self.links.get(record.spec.peer)
        if link is not None:
            link.recheck()

    async def forward(self, record: ModelRecord, action: str) -> None:
        """A load or unload of a peer's model, done by the peer (its answer's error is ours)."""
        link = self.links.get(record.spec.peer)
        if link is None:
            raise PeerAnswered(503, f"peer {record.spec.peer} is gone", "unavailable_error")
        await link.control(action, record.spec.peer_model)


class PeerLink:
    """One peer: its feed followed, its models kept as records here."""

    def __init__(self, registry: Registry, name: str, upstream: Upstream) -> None:
        self.registry = registry
        self.name = name
        self.upstream = upstream
        self.records: dict[str, ModelRecord] = {}  # the peer's model name -> its record here
        # Models the peer itself has from its own peers: never mirrored, or two routers that peer
        # each other would nest names without end (x@b@a@b...) and send requests round in a loop.
        self.not_its_own: set[str] = set()
        self._asked: set[str] = set()
        self._relist_task: asyncio.Task[None] | None = None
        self._list_digest = b""
        self._followed_since: float | None = None
        self._listed_at = 0.0
        self._last_recheck = 0.0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._down_reason: str | None = None
        self._feed: UpstreamResponse | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"peer-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for record in list(self.records.values()):
            self._drop(record)

    def recheck(self) -> None:
        """A request could not connect to the peer: follow its feed anew, which says whether it is
        there (at most once a second, however many requests fail)."""
        now = time.monotonic()
        if now - self._last_recheck < RECHECK_INTERVAL_S:
            return
        self._last_recheck = now
        self._wake.set()
        if self._feed is not None:
            self._feed.release()  # the feed ends here; _run follows it again at once

    async def _run(self) -> None:
        """Follow the feed for as long as the router runs. A feed that was followed for a while and
        ends is opened again at once, the models kept as they are; one that cannot be opened, or
        ends soon, turns the models unloaded and is retried with backoff."""
        backoff = BACKOFF_FIRST_S
        while True:
            self._wake.clear()
            self._followed_since = None
            ended_cleanly = False
            try:
                await self._follow()
                reason, ended_cleanly = "its feed ended", True
            except (PeerFeedBroken, UpstreamError) as exc:
                reason = str(exc)
            except TimeoutError:
                reason = f"no answer within {REQUEST_TIMEOUT_S:g} s"
            except Exception as exc:  # noqa: BLE001 - whatever a peer sends, the link lives on
                log.exception("peer %s: following its feed failed", self.name)
                reason = f"{type(exc).__name__}"
            finally:
                self._feed = None
                if self._relist_task is not None:
                    self._relist_task.cancel()
            if self._wake.is_set():
                continue  # asked to look again: at once, and its models stay as they are
            followed_s = time.monotonic() - self._followed_since if self._followed_since is not None else 0.0
            if ended_cleanly and followed_s >= STABLE_FEED_S:
                # A feed followed for a while that the peer ended (it restarts, say): opened again
                # at once; if that fails, the models are marked down then. A feed that broke or
                # went silent marks them down now.
                backoff = BACKOFF_FIRST_S
                continue
            self._mark_down(f"peer {self.name} unreachable: {reason}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _follow(self) -> None:
        """Open the feed, take the peer's list, then mirror events until the feed ends."""
        to = self.upstream
        http = self.registry.http
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            feed = await http.request("GET", to.host, to.port, "/models/sse",
                                      [(b"accept", b"text/event-stream"), *to.headers],
                                      read_timeout_s=FEED_SILENCE_S)
        self._feed = feed
        self._list_digest = b""  # a new feed: the list is taken whatever it was before
        try:
            if feed.status != 200:
                raise PeerFeedBroken(f"/models/sse answered {feed.status}")
            await self._relist()
            self._followed_since = time.monotonic()
            if self._down_reason is not None:
                log.info("peer %s is back: %d models", self.name, len(self.records))
            self._down_reason = None
            pending = b""
            data: list[bytes] = []
            size = 0
            async for chunk in feed.chunks():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > MAX_LINE_BYTES:
                    raise PeerFeedBroken(f"a line of /models/sse over {MAX_LINE_BYTES} bytes")
                for line in lines:
                    line = line.rstrip(b"\r")
                    if line.startswith(b"data:"):
                        data.append(line[5:].strip())
                        size += len(line)
                        if size > MAX_LINE_BYTES:
                            raise PeerFeedBroken(f"an event of /models/sse over {MAX_LINE_BYTES} bytes")
                    elif not line and data:
                        self._take_event(b"\n".join(data))
                        data, size = [], 0
        finally:
            feed.release()

    def _relist_soon(self) -> None:
        """Take the peer's list again, at most once every RECHECK_INTERVAL_S, beside the feed."""
        if self._relist_task is None or self._relist_task.done():
            self._relist_task = asyncio.create_task(self._relist_later(), name=f"peer-{self.name}-list")

    async def _relist_later(self) -> None:
        await asyncio.sleep(max(0.0, self._listed_at + RECHECK_INTERVAL_S - time.monotonic()))
        try:
            await self._relist()
        except (PeerFeedBroken, UpstreamError, TimeoutError) as exc:
            log.warning("peer %s: its list could not be taken again: %s", self.name, exc)
            self.recheck()

    async def _relist(self) -> None:
        """Take the peer's /models (bounded in time and size; a list as it was last is not read again)."""
        self._listed_at = time.monotonic()
        to = self.upstream
        status, body = await self.registry.http.fetch("GET", to.host, to.port, "/models", REQUEST_TIMEOUT_S,
                                                      to.headers, limit=MAX_LIST_BYTES)
        if status != 200:
            raise PeerFeedBroken(f"/models answered {status}")
        digest = hashlib.sha256(body).digest()
        if digest != self._list_digest:
            self._take_list(body)
            self._list_digest = digest

    def _take_list(self, body: bytes) -> None:
        try:
            listed = json.loads(body)["data"]
            entries = {e["id"]: e for e in listed if isinstance(e, dict) and _acceptable_name(e.get("id"))}
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise PeerFeedBroken(f"/models is not a model list ({type(exc).__name__})") from exc
        self.not_its_own = {model for model, entry in entries.items() if entry.get("source") == SOURCE_PEER}
        entries = {model: entry for model, entry in entries.items() if model not in self.not_its_own}
        if len(entries) > MAX_MODELS:
            raise PeerFeedBroken(f"/models lists {len(entries)} models (at most {MAX_MODELS} are taken)")
        for model, gone in list(self.records.items()):
            if model not in entries:
                self._drop(gone)
        for model, entry in entries.items():
            record = self._record(model, entry)
            if record is None:
                continue
            status = entry.get("status")
            value = status.get("value") if isinstance(status, dict) else None
            self._mirror(record, STATUSES.get(value, ModelStatus.UNLOADED) if isinstance(value, str)
                         else ModelStatus.UNLOADED, "(listed by the peer)")

    def _take_event(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
            model, event, data = message["model"], message["event"], message.get("data") or {}
            if not isinstance(model, str) or not isinstance(event, str) or not isinstance(data, dict):
                raise TypeError(type(message).__name__)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise PeerFeedBroken(f"/models/sse sent what is not a status event ({type(exc).__name__})") from exc
        if event == "models_reload":
            self._relist_soon()  # its list changed: take it anew
        elif not _acceptable_name(model):
            return  # a name this router does not take (see _acceptable_name)
        elif event == "model_remove":
            record = self.records.get(model)
            if record is not None:
                self._drop(record)
        elif event in ("status_change", "model_status"):
            value = data.get("status")
            status = STATUSES.get(value) if isinstance(value, str) else None
            if status is None:
                raise PeerFeedBroken(f"/models/sse sent an unknown status {data.get('status')!r}")
            record = self.records.get(model)
            if record is not None:
                progress = data.get("progress") if isinstance(data.get("progress"), dict) else None
                self._mirror(record, status, "(the peer says so)", progress)
            elif model not in self.not_its_own and model not in self._asked and len(self._asked) < MAX_MODELS:
                # New to its list: take the list, which says whose it is. Once per name: a model
                # the list does not show (`unlisted` there) is not asked about again and again.
                self._asked.add(model)
                self._relist_soon()

    def _record(self, model: str, entry: dict[str, Any]) -> ModelRecord | None:
        record = self.records.get(model)
        kept = {k: entry[k] for k in ENTRY_KEYS if k in entry}
        try:
            if len(json.dumps(kept)) > MAX_ENTRY_BYTES:
                kept = {}
        except (TypeError, ValueError, RecursionError):
            kept = {}
        aliases = entry.get("aliases")
        aliases = tuple(a for a in aliases if _acceptable_name(a))[:16] if isinstance(aliases, list) else ()
        if record is not None:
            record.peer_entry = kept
            if aliases != record.spec.aliases:
                self.registry.respec(record, dataclasses.replace(record.spec, aliases=aliases))
            return record
        if len(self.records) >= MAX_MODELS:
            raise PeerFeedBroken(f"more than {MAX_MODELS} models")
        key = f"{model}@{self.name}"
        if key in self.registry.records:
            log.warning("peer %s: its model %s is not served: %s is already a model here", self.name, model, key)
            return None
        spec = ModelSpec(name=key, source=SOURCE_PEER, peer=self.name, peer_model=model, aliases=aliases)
        record = self.registry.add_elsewhere(spec)
        record.peer_entry = kept
        record.upstream = Upstream(self.upstream.host, self.upstream.port, self.upstream.headers, model,
                                   another_router=True)
        self.records[model] = record
        return record

    def _mirror(self, record: ModelRecord, status: ModelStatus, reason: str,
                progress: dict[str, Any] | None = None) -> None:
        record.unreachable = None
        self.registry.set_status(record, status, reason, progress=progress, elsewhere=True)

    def _drop(self, record: ModelRecord) -> None:
        self.records.pop(record.spec.peer_model, None)
        self.registry.drop_elsewhere(record)

    def _mark_down(self, reason: str) -> None:
        if self._down_reason is None:
            log.warning("%s: its %d models are unloaded here until it is back", reason, len(self.records))
        self._down_reason = reason
        for record in self.records.values():
            if record.unreachable != reason:
                record.unreachable = reason
                self.registry.set_status(record, ModelStatus.UNLOADED, f"({reason})", error=reason, elsewhere=True)

    async def control(self, action: str, model: str) -> None:
        to = self.upstream
        body = json.dumps({"model": model}).encode()
        try:
            status, data = await self.registry.http.fetch(
                "POST", to.host, to.port, f"/models/{action}", self.registry.settings.timeout_s,
                [(b"content-type", b"application/json"), *to.headers], body, MAX_CONTROL_ANSWER_BYTES)
        except (UpstreamError, TimeoutError) as exc:
            raise PeerAnswered(502, f"peer {self.name} did not answer the {action}: {exc}") from exc
        if status != 200:
            try:
                error = json.loads(data)["error"]
                message, kind = str(error["message"]), str(error.get("type", "server_error"))
            except (ValueError, KeyError, TypeError, RecursionError):
                message, kind = data[:200].decode("utf-8", "replace"), "server_error"
            raise PeerAnswered(status, f"peer {self.name}: {message}", kind)
