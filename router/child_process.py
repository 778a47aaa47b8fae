"""One child process: spawn, read its pipes, watch its exit, stop it.

The child runs in its own process group (start_new_session) so a stop can kill everything it
started. stdout carries protocol lines mixed with any log lines (llama.cpp's children mix them);
stderr carries logs, forwarded with the model name as prefix. Exactly one exit watcher reports the
exit code, after both pipes are drained, so the last log lines are never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable

from child.protocol import ROUTER_TO_CHILD_EXIT, ProtocolError, StateMessage, parse_child_line
from router.orphan_reaper import OrphanReaper

log = logging.getLogger(__name__)

# The ready payload of a foreign child can be large (chat templates): allow long lines.
_LINE_LIMIT_BYTES = 4 * 1024 * 1024
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the forked child, before exec: the kernel SIGKILLs it when the router dies.

    For children that do not speak the protocol (a `cmd` server) and so cannot notice that their
    stdin closed, this is what keeps them from outliving a router that was SIGKILLed.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ChildProcess:
    def __init__(self, name: str, argv: list[str], env: dict[str, str],
                 on_state: Callable[[StateMessage], None], on_exit: Callable[[int], None],
                 speaks_protocol: bool = True, on_log: Callable[[str], None] | None = None,
                 reaper: OrphanReaper | None = None) -> None:
        self.name = name
        self._on_log = on_log
        self.speaks_protocol = speaks_protocol
        self.argv = argv
        self.env = env
        self._on_state = on_state
        self._on_exit = on_exit
        self._reaper = reaper
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._start_ended = asyncio.Event()  # set once start() has returned or failed
        self.exited = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True, limit=_LINE_LIMIT_BYTES,
                preexec_fn=None if self.speaks_protocol else _die_with_parent,
            )
        finally:
            self._start_ended.set()
        if self._reaper is not None:
            self._reaper.watch(self._proc.pid)  # its own session: the group id is its pid
        log.info("[%s] started child pid %d: %s", self.name, self._proc.pid, " ".join(self.argv))
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._tasks = [
            asyncio.create_task(self._read_stdout(self._proc.stdout)),
            asyncio.create_task(self._read_stderr(self._proc.stderr)),
        ]
        self._tasks.append(asyncio.create_task(self._watch_exit()))

    async def _read_lines(self, stream: asyncio.StreamReader, handle: Callable[[str], None]) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the limit: skip what was buffered, keep reading
                log.warning("[%s] overlong output line skipped", self.name)
                continue
            except (ConnectionError, OSError):
                return
            if not raw:
                return
            handle(raw.decode("utf-8", errors="replace").rstrip("\r\n"))

    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        def handle(line: str) -> None:
            if not self.speaks_protocol:
                self._log_line(line)
                return
            try:
                message = parse_child_line(line)
            except ProtocolError as exc:
                log.warning("[%s] malformed protocol line ignored (%s): %.200s", self.name, exc, line)
                return
            if message is None:
                if line.strip():
                    self._log_line(line)
                return
            try:
                self._on_state(message)
            except Exception:  # noqa: BLE001 - a bad state report must not kill the reader
                log.exception("[%s] state %s could not be applied", self.name, message.state)

        await self._read_lines(stream, handle)

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        await self._read_lines(stream, self._log_line)

    def _log_line(self, line: str) -> None:
        log.info("[%s] %s", self.name, line)
        if self._on_log is not None:
            self._on_log(line)

    async def _watch_exit(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        # Drain the pipes (bounded: a grandchild may hold them open).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._tasks[:2], return_exceptions=True), 2.0)
        log.info("[%s] child pid %d exited with code %d", self.name, self._proc.pid, code)
        self._kill_group(signal.SIGKILL)  # anything the child left behind in its group
        if self._reaper is not None:
            self._reaper.forget(self._proc.pid)
        self.exited.set()
        self._on_exit(code)

    def _kill_group(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def stop(self, timeout_s: float, kill_now: bool = False) -> None:
        """Ask the child to exit; SIGKILL its process group if it is still alive after timeout_s.

        Shielded: a cancelled caller (a client that went away) never leaves a child half-stopped.
        """
        await asyncio.shield(self._stop(timeout_s, kill_now))

    async def _stop(self, timeout_s: float, kill_now: bool) -> None:
        await self._start_ended.wait()  # a stop that races the spawn must still find the process
        if self._proc is None or self.exited.is_set():
            return
        if not kill_now:
            if self.speaks_protocol:
                self._send_exit_command()
            else:
                self._kill_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.exited.wait(), timeout_s)
                return
            except TimeoutError:
                log.warning("[%s] still alive %.1f s after the %s: killing it", self.name, timeout_s,
                            "exit command" if self.speaks_protocol else "SIGTERM")
        self._kill_group(signal.SIGKILL)
        await self.exited.wait()

    def _send_exit_command(self) -> None:
        assert self._proc is not None
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing():
            return
        with contextlib.suppress(ConnectionError, OSError):
            stdin.write((ROUTER_TO_CHILD_EXIT + "\n").encode())

    def kill_now_sync(self) -> None:
        """Last resort at router exit: no awaiting, just SIGKILL the group."""
        self._kill_group(signal.SIGKILL)
