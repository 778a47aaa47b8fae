"""Preset INI files in llama.cpp's format.

    version = 1
    [*]                 ; applies to every model
    c = 4096
    [smollm2]           ; one model
    model = /path/to/file.gguf
    alias = small,chat
    load-on-startup = true
    [qwen]              ; fetched from the Hugging Face Hub on its first load
    hf-repo = user/repo:Q4_K_M

Keys are child flags by long name (dashes or underscores), short name or LLAMA_ARG_* name, or one
of the preset-only keys. An unknown key stops the router with the file, line and key, because a
typo that silently does nothing is worse than a refusal. Parsed by hand rather than with
configparser so that every error can name its line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from child.arguments import find_arg
from child.foreign_flags import foreign_preset_key, hf_source_key
from router.errors import ConfigError

log = logging.getLogger(__name__)


GLOBAL_SECTION = "*"

# Keys the router reads itself; they never reach a child's command line.
PRESET_ONLY_KEYS = (
    "load-on-startup",
    "stop-timeout",
    # A llama-server-compatible program to run instead of modelyard's child (llama.cpp's own
    # llama-server, say), split like a shell command line (no shell runs it).
    "bin",
    # Any OpenAI-compatible server, with ${PORT} and ${MODEL} macros; ready when check-endpoint
    # answers 200, given up after load-timeout seconds.
    "cmd",
    "check-endpoint",
    "load-timeout",
    # Never evicted to make room.
    "pin",
    # Unloaded after this many seconds without requests (overrides --models-ttl).
    "ttl",
    # llama-swap's: variables for the child's environment (`env = CUDA_VISIBLE_DEVICES=0, FOO=bar`),
    # requests in flight at most (beyond it a 429), and a model that is served but not listed.
    "env",
    "concurrency-limit",
    "unlisted",
    # A remote model: any OpenAI-compatible server at this URL, never spawned (router/remote_models.py),
    # with the bearer key it wants, the model's name there, and the seconds between health checks.
    # A section named `name@where` is a replica of the model `name`.
    "url",
    "api-key",
    "use-model-name",
    "check-interval",
)

# Router-wide keys, in the preset's global part ([*] or before any section).
ROUTER_WIDE_KEYS = ("peers",)

TRUE_WORDS = {"1", "true", "on", "yes", "enabled"}
FALSE_WORDS = {"0", "false", "off", "no", "disabled"}


@dataclass
class PresetSection:
    name: str
    line: int
    options: dict[str, str | bool] = field(default_factory=dict)  # child flag long name -> value
    router_options: dict[str, str] = field(default_factory=dict)  # preset-only key -> raw value


@dataclass
class PresetFile:
    path: Path
    global_section: PresetSection
    sections: list[PresetSection]


def parse_bool(value: str, where: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _normalize_key(key: str) -> str:
    return key.strip().lower().lstrip("-").replace("_", "-")


def parse_preset_text(text: str, path: Path) -> PresetFile:
    global_section = PresetSection(GLOBAL_SECTION, 0)
    sections: list[PresetSection] = []
    current = global_section
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(f"{where}: section header is missing its ']'")
            name = line[1:-1].strip()
            if not name:
                raise ConfigError(f"{where}: empty section name")
            if name == GLOBAL_SECTION:
                current = global_section
                continue
            if name in seen:
                raise ConfigError(f"{where}: model [{name}] appears twice")
            seen.add(name)
            current = PresetSection(name, number)
            sections.append(current)
            continue
        if "=" not in line:
            raise ConfigError(f"{where}: expected 'key = value', got {line!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if key == "version" and current is global_section and not sections:
            if value != "1":
                raise ConfigError(f"{where}: unsupported preset version {value!r} (expected 1)")
            continue
        normalized = _normalize_key(key)
        hf_key = hf_source_key(key)
        if hf_key is not None:
            # llama-server's -hf/-hff: the router downloads the file before the load (see
            # router/downloads.py); a child never sees them.
            if current is global_section:
                raise ConfigError(f"{where}: '{key}' names one model's file: give it in that model's section")
            current.router_options[hf_key] = value
            continue
        if normalized in ROUTER_WIDE_KEYS:
            if current is not global_section:
                raise ConfigError(f"{where}: '{key}' is router-wide: give it in [*] or before any section")
            current.router_options[normalized] = value
            continue
        if normalized in ("url", "use-model-name") and current is global_section:
            raise ConfigError(f"{where}: '{key}' belongs to one remote model: give it in that model's section")
        if normalized in PRESET_ONLY_KEYS and not (normalized == "api-key" and current is global_section):
            current.router_options[normalized] = value
            continue
        spec = find_arg(key) or find_arg(normalized)
        if spec is not None and spec.long not in ("host", "port"):
            current.options[spec.long] = parse_bool(value, where) if not spec.takes_value else value
            continue
        # Any other llama-server flag goes to the child as given, as llama.cpp's router does; the
        # router's own options (host, port, models-*, api keys) mean nothing in a section.
        foreign = foreign_preset_key(key) if spec is None else None
        if foreign is None:
            raise ConfigError(f"{where}: unknown key '{key}'")
        if foreign.server_level:
            log.warning("%s: '%s' is a router option, not a model's: ignored here (give it on the command line)",
                        where, key)
            continue
        current.options[foreign.long] = parse_bool(value, where) if foreign.values == 0 else value
    return PresetFile(path, global_section, sections)


def load_preset_file(path: str | Path) -> PresetFile:
    preset_path = Path(path)
    try:
        text = preset_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read preset file {preset_path}: {exc.strerror or exc}") from exc
    return parse_preset_text(text, preset_path)


def render_ini(name: str, options: dict[str, str | bool], router_options: dict[str, str]) -> str:
    """A model's merged preset as INI text (shown in /models as status.preset)."""
    lines = [f"[{name}]"]
    for key, value in options.items():
        lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    for key, raw in router_options.items():
        if key in ROUTER_WIDE_KEYS:
            continue
        lines.append(f"{key} = {'(hidden)' if key == 'api-key' else raw}")  # a key is never shown
    return "\n".join(lines) + "\n"
