"""Resumable streams: llama.cpp's SSE replay buffer.

A streaming request with `X-Conversation-Id: <id>` writes its SSE bytes into that conversation's
session instead of straight to the client, and keeps generating when the client goes away. Any
number of readers follow a session from an absolute byte offset: what is still buffered is
replayed, then live bytes follow until the generation ends. The buffer is capped (oldest bytes
dropped; a reader asking for a dropped offset is told to restart). One conversation has at most
one live session: a new one cancels the old. Finished sessions expire after a TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

log = logging.getLogger(__name__)


class OffsetLost(Exception):
    """The asked offset is older than the buffer's oldest byte."""


class StreamSession:
    def __init__(self, conversation_id: str, cap_bytes: int) -> None:
        self.conversation_id = conversation_id
        self.cap_bytes = cap_bytes
        self.started_at = time.time()
        self.completed_at: float | None = None
        self._buffer = bytearray()
        self._dropped = 0  # absolute offset of _buffer[0]
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.number = 0  # its request's Reservation.number

    @property
    def total_bytes(self) -> int:
        return self._dropped + len(self._buffer)

    @property
    def is_done(self) -> bool:
        return self.completed_at is not None

    def append(self, data: bytes) -> None:
        self._buffer += data
        overflow = len(self._buffer) - self.cap_bytes
        if overflow > 0:
            del self._buffer[:overflow]
            self._dropped += overflow
        self._wake()

    def finish(self) -> None:
        if self.completed_at is None:
            self.completed_at = time.time()
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def check_offset(self, offset: int) -> None:
        if offset < self._dropped:
            raise OffsetLost(offset)

    async def follow(self, offset: int) -> AsyncIterator[bytes]:
        """Bytes from `offset` on, live until the session ends. Raises OffsetLost."""
        while True:
            self.check_offset(offset)
            if offset < self.total_bytes:
                data = bytes(self._buffer[offset - self._dropped:])
                offset += len(data)
                yield data
                continue
            if self.is_done:
                return
            await self._changed.wait()

    def describe(self) -> dict[str, Any]:
        return {"conversation_id": self.conversation_id, "is_done": self.is_done,
                "total_bytes": self.total_bytes, "started_at": self.started_at,
                "completed_at": self.completed_at}


class Reservation:
    """A resumable request of a conversation, from its arrival (before its body is read) until its
    session starts: a DELETE meanwhile (while the request is read, templated, its grammar
    compiled) cancels it too, not only a session that already runs. Numbered in order of arrival:
    of two requests of one conversation, the later one wins, whichever is ready first."""

    def __init__(self, conversation_id: str, number: int) -> None:
        self.conversation_id = conversation_id
        self.number = number
        self.cancelled: str | None = None  # why it must not start


class SessionStore:
    def __init__(self, cap_bytes: int, ttl_s: float) -> None:
        self.cap_bytes = cap_bytes
        self.ttl_s = ttl_s
        self._sessions: dict[str, StreamSession] = {}
        self._reserved: dict[str, set[Reservation]] = {}  # bounded by the requests being prepared
        self._arrivals = itertools.count(1)
        self._sweeper: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def reserve(self, conversation_id: str | None) -> Iterator[Reservation | None]:
        """`with store.reserve(id) as reservation:` prepare the request, then `start` its session
        with the reservation. None in, None out: a request that is not resumable."""
        if conversation_id is None:
            yield None
            return
        reservation = Reservation(conversation_id, next(self._arrivals))
        self._reserved.setdefault(conversation_id, set()).add(reservation)
        try:
            yield reservation
        finally:
            reservations = self._reserved.get(conversation_id)
            if reservations is not None:
                reservations.discard(reservation)
                if not reservations:
                    del self._reserved[conversation_id]

    def get(self, conversation_id: str) -> StreamSession | None:
        self._expire()
        return self._sessions.get(conversation_id)

    def refusal(self, reservation: Reservation) -> str | None:
        """Why the reserved request must not start: deleted meanwhile, or a later request of the
        conversation has started already."""
        running = self._sessions.get(reservation.conversation_id)
        if reservation.cancelled is None and running is not None and running.number > reservation.number:
            return "replaced by a later request"
        return reservation.cancelled

    def start(self, reservation: Reservation, source: AsyncIterator[bytes]) -> StreamSession:
        """A new session fed by `source` in the background; replaces (and cancels) an older one,
        and stops the conversation's requests that came before it and are still being prepared.
        The caller has checked `refusal`."""
        conversation_id = reservation.conversation_id
        for earlier in self._reserved.get(conversation_id, ()):
            if earlier.number < reservation.number:
                earlier.cancelled = "replaced by a later request"
        self._stop_session(conversation_id)
        session = StreamSession(conversation_id, self.cap_bytes)
        session.number = reservation.number
        session.task = asyncio.create_task(self._pump(session, source), name=f"stream-{conversation_id}")
        self._sessions[conversation_id] = session
        self._ensure_sweeper()
        return session

    async def _pump(self, session: StreamSession, source: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in source:
                session.append(chunk)
        except asyncio.CancelledError:
            log.info("stream %s cancelled after %d bytes", session.conversation_id, session.total_bytes)
            raise
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()  # frees the engine slot at once
            session.finish()

    def cancel(self, conversation_id: str) -> bool:
        """DELETE: stop a conversation's generation, and its requests still being prepared; True
        if there was a session."""
        for reservation in self._reserved.get(conversation_id, ()):
            reservation.cancelled = "deleted"
        return self._stop_session(conversation_id)

    def _stop_session(self, conversation_id: str) -> bool:
        session = self._sessions.pop(conversation_id, None)
        if session is None:
            return False
        if session.task is not None and not session.task.done():
            session.task.cancel()
        session.finish()
        return True

    def lookup(self, conversation_ids: list[str]) -> list[dict[str, Any]]:
        self._expire()
        return [self._sessions[cid].describe() for cid in conversation_ids if cid in self._sessions]

    def _expire(self) -> None:
        now = time.time()
        for cid, session in list(self._sessions.items()):
            if session.completed_at is not None and now - session.completed_at > self.ttl_s:
                del self._sessions[cid]

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="stream-sweeper")

    async def _sweep(self) -> None:
        # Removes expired sessions even when nobody asks; ends when there is nothing left to watch.
        while self._sessions:
            await asyncio.sleep(min(self.ttl_s, 30.0) / 2 or 0.1)
            self._expire()

    def close(self) -> None:
        for cid in list(self._sessions):
            self.cancel(cid)
        if self._sweeper is not None:
            self._sweeper.cancel()

