"""Reading a GGUF file's metadata header without decoding what nobody asked for.

Admission needs a handful of numbers (architecture, layers, heads, context) from a model's header.
gguf's GGUFReader decodes every field, the vocabulary too: seconds for a 262k-token vocabulary,
and megabytes of Python objects. Here the file is mapped and walked: scalar fields are decoded,
numeric arrays only outside `tokenizer.*` and when short (a value per layer, not a table: a file
from the internet must not make the router build a huge list), and string arrays are stepped over
by their lengths. Any malformed or cut-short header is a GGUFHeaderError.

Blocking file I/O: callers run it off the event loop.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"

# GGUF value types -> struct format of one element (strings and arrays are variable).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
MAX_KEPT_ARRAY = 4096  # elements; per-layer values stay far below


class GGUFHeaderError(ValueError):
    pass


class _Cursor:
    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.offset = 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.data, self.offset)[0]
        self.offset += struct.calcsize(fmt)
        return value

    def u32(self) -> int:
        value = _U32.unpack_from(self.data, self.offset)[0]
        self.offset += 4
        return int(value)

    def u64(self) -> int:
        value = _U64.unpack_from(self.data, self.offset)[0]
        self.offset += 8
        return int(value)

    def string(self) -> str:
        length = self.u64()
        end = self.offset + length
        if end > len(self.data):
            raise GGUFHeaderError("a string runs past the end of the file")
        text = bytes(self.data[self.offset:end]).decode("utf-8", errors="replace")
        self.offset = end
        return text

    def skip_strings(self, count: int) -> None:
        data, offset, size = self.data, self.offset, len(self.data)
        unpack = _U64.unpack_from
        for _ in range(count):
            offset += 8 + unpack(data, offset)[0]
            if offset > size:
                raise GGUFHeaderError("a string array runs past the end of the file")
        self.offset = offset


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata field but the tokenizer's arrays: {key: scalar, string or list of numbers}."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != MAGIC:
            raise GGUFHeaderError("not a GGUF file (bad magic)")
        cursor = _Cursor(data)
        cursor.offset = 4
        fields: dict[str, Any] = {}
        try:
            version = cursor.u32()
            if version < 2:
                raise GGUFHeaderError(f"GGUF version {version} is not supported")
            cursor.u64()  # tensor count
            for _ in range(cursor.u64()):
                key = cursor.string()
                kind = cursor.u32()
                fields[key] = _read_value(cursor, kind, keep=not key.startswith("tokenizer."))
        except (struct.error, OverflowError, MemoryError) as exc:
            raise GGUFHeaderError("the header is cut short or malformed") from exc
        return {k: v for k, v in fields.items() if v is not None}


def _read_value(cursor: _Cursor, kind: int, keep: bool) -> Any:
    if kind in _SCALARS:
        return cursor.take(_SCALARS[kind])
    if kind == _STRING:
        return cursor.string()
    if kind != _ARRAY:
        raise GGUFHeaderError(f"unknown GGUF value type {kind}")
    element, count = cursor.u32(), cursor.u64()
    if element == _STRING:
        cursor.skip_strings(count)
        return None
    if element not in _SCALARS:
        raise GGUFHeaderError(f"array of GGUF value type {element} is not supported")
    fmt = _SCALARS[element]
    size = struct.calcsize(fmt) * count
    if cursor.offset + size > len(cursor.data):
        raise GGUFHeaderError("an array runs past the end of the file")
    keep = keep and count <= MAX_KEPT_ARRAY
    values = list(struct.unpack_from(f"<{count}{fmt[1]}", cursor.data, cursor.offset)) if keep else None
    cursor.offset += size
    return values
