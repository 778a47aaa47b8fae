"""The child's side of the router protocol: state lines on stdout, commands on stdin.

Under a router (LLAMA_SERVER_ROUTER_PORT set) stdout carries only protocol lines: the real stdout
is kept for them and sys.stdout is pointed at stderr, so no stray print can corrupt the protocol.
A watcher thread reads stdin: the exit command starts a graceful stop; EOF means the router is
gone, and the child exits at once, even in the middle of loading the model. No orphans.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from child.protocol import ROUTER_PORT_ENV, ChildState, encode_state, is_exit_command

log = logging.getLogger(__name__)

# Exit status when the router disappears: not 0, because the work was cut short.
EXIT_ROUTER_GONE = 3


class RouterLink:
    def __init__(self, protocol_out: TextIO | None) -> None:
        self._out = protocol_out
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls) -> RouterLink:
        if not os.environ.get(ROUTER_PORT_ENV):
            return cls(None)
        protocol_out = sys.stdout
        sys.stdout = sys.stderr
        return cls(protocol_out)

    def announce(self, state: ChildState, payload: dict[str, Any] | None = None) -> None:
        if self._out is None:
            return
        line = encode_state(state, payload)
        with self._lock:
            try:
                self._out.write(line + "\n")
                self._out.flush()
            except (BrokenPipeError, ValueError):
                os._exit(EXIT_ROUTER_GONE)

    def watch_stdin(self, on_exit_command: Callable[[], None]) -> None:
        """Start the stdin watcher (only under a router)."""
        if self._out is None:
            return
        thread = threading.Thread(target=self._watch, args=(on_exit_command,), name="stdin-watch",
                                  daemon=True)
        thread.start()

    def _watch(self, on_exit_command: Callable[[], None]) -> None:
        stdin = sys.stdin.buffer
        while True:
            raw = stdin.readline()
            if not raw:
                # Flushing logs could block on a dead pipe; leave right now.
                os._exit(EXIT_ROUTER_GONE)
            line = raw.decode("utf-8", errors="replace")
            if is_exit_command(line):
                log.info("exit command received from the router")
                on_exit_command()
            elif line.strip():
                log.warning("ignoring unknown command from the router: %r", line.strip()[:200])
