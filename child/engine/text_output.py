"""Turning sampled tokens into streamed text: UTF-8 reassembly and stop strings.

A token can end in the middle of a UTF-8 character, and a stop string can be split across tokens:
text is released only when it can no longer become part of a stop string, so a partial stop string
never leaks into the output.
"""

from __future__ import annotations

import codecs


class TextAssembler:
    def __init__(self, stop: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""  # text that could still be the start of a stop string
        self.stopped_by: str | None = None

    def push(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to emit.

        After a stop string is found, `stopped_by` is set and the text before it is returned.
        """
        self._held += self._decoder.decode(piece)
        if not self._stop:
            out, self._held = self._held, ""
            return out
        first_hit = -1
        for s in self._stop:
            pos = self._held.find(s)
            if pos >= 0 and (first_hit < 0 or pos < first_hit):
                first_hit, self.stopped_by = pos, s
        if first_hit >= 0:
            out, self._held = self._held[:first_hit], ""
            return out
        keep = self._longest_stop_prefix_suffix()
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out

    def finish(self) -> str:
        """The rest of the text when generation ends without a stop string."""
        out = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return out

    def _longest_stop_prefix_suffix(self) -> int:
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._held)), best, -1):
                if self._held.endswith(s[:n]):
                    best = n
                    break
        return best
