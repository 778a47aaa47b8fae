"""The orphan reaper: kills every child's process group once the router is gone, however it went.

A child that notices the router leaving (stdin EOF for a protocol child, the kernel's parent-death
signal for a `cmd` server) stops itself, but what it started does not: `cmd = sh -c "..."` leaves
the shell's children running after a SIGKILLed router. Only a process that outlives the router
can stop them, so the router starts this one at startup and tells it, on its stdin, each child's
process group as it starts (`+PGID`) and ends (`-PGID`). When its stdin reaches EOF, the router
has exited (a SIGKILL included), and it SIGKILLs every group still listed.

Standard library only and a few lines, so it starts in milliseconds and costs a few MB.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger(__name__)


def main() -> None:
    # Keyboard interrupts go to the router's process group; this process has its own session, but
    # ignore them anyway: its job starts when the router's ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line[:1] in ("+", "-") and line[1:].isdigit():
            (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


class OrphanReaper:
    """The router's end: starts the reaper and keeps it informed (never raises)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            # Run as a plain script in isolated mode: only the standard library on its path.
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.warning("cannot start the orphan reaper (grandchildren of children may outlive a killed "
                        "router): %s", exc)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _tell(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            log.warning("the orphan reaper is gone; grandchildren of children may outlive a killed router")
            self._proc = None

    def watch(self, pgid: int) -> None:
        self._tell(f"+{pgid}")

    def forget(self, pgid: int) -> None:
        self._tell(f"-{pgid}")

    def close(self) -> None:
        """At a clean exit: the reaper kills what is left and leaves."""
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)


if __name__ == "__main__":
    main()
