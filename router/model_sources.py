"""Where models come from: preset sections, a --models-dir folder, and the router's own flags.

Each source yields ModelSpecs; precedence of options is router command line > model section >
[*] (as llama.cpp's router). A model's child command line is rendered from its options.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from child.foreign_flags import foreign_flag
from router.errors import ConfigError
from router.gguf_files import is_main_gguf, pick_projector, strip_shard
from router.hf_cache import list_cached_models
from router.presets import PresetFile, load_preset_file, parse_bool, render_ini
from router.settings import RouterSettings

SOURCE_PRESET = "preset"
SOURCE_MODELS_DIR = "models_dir"
SOURCE_CACHE = "cache"

# Preset keys that hold a file path: a relative one is taken from the preset file's folder.
PATH_OPTIONS = ("model", "mmproj", "chat-template-file")

# Options the router passes itself or keeps for the listing; never rendered from a preset.
_NOT_RENDERED = {"alias", "tags", "host", "port"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    options: dict[str, str | bool] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    load_on_startup: bool = False
    stop_timeout_s: float = 10.0
    preset_ini: str = ""
    foreign_bin: tuple[str, ...] = ()  # a llama-server-compatible program; empty = modelyard's child
    foreign_cmd: tuple[str, ...] = ()  # any OpenAI-compatible server (no protocol), with ${PORT}/${MODEL}
    check_endpoint: str = "/health"
    load_timeout_s: float = 600.0
    pinned: bool = False
    ttl_s: float | None = None  # None: the router's --models-ttl

    @property
    def speaks_protocol(self) -> bool:
        return not self.foreign_cmd

    @property
    def model_value(self) -> str:
        return str(self.options.get("model", ""))

    def child_args(self, model_path: str | None = None) -> list[str]:
        """Flags for the child (without host, port and alias, which the router adds)."""
        args: list[str] = []
        for key, value in self.options.items():
            if key in _NOT_RENDERED:
                continue
            if key == "model" and model_path is not None:
                value = model_path
            if isinstance(value, bool):
                if value:
                    args.append(f"--{key}")
            elif (flag := foreign_flag(f"--{key}")) is not None and flag.values > 1:
                args.extend([f"--{key}", *str(value).split()])  # llama-server's two-value flags
            else:
                args.extend([f"--{key}", str(value)])
        return args


def _split_list(value: str | bool | None) -> tuple[str, ...]:
    if not isinstance(value, str):
        return ()
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _seconds(router_options: dict[str, str], key: str, default: float, where: str) -> float:
    if key not in router_options:
        return default
    try:
        value = float(router_options[key])
    except ValueError as exc:
        raise ConfigError(f"{where}: {key} must be a number of seconds") from exc
    if value < 0 and key != "ttl":
        raise ConfigError(f"{where}: {key} must not be negative")
    return value


def _command(router_options: dict[str, str], key: str, where: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(router_options.get(key, "")))
    except ValueError as exc:
        raise ConfigError(f"{where}: {key}: {exc}") from exc


def _make_spec(name: str, source: str, options: dict[str, str | bool], router_options: dict[str, str],
               settings: RouterSettings, where: str) -> ModelSpec:
    merged = {**options, **settings.global_child_args}
    foreign_cmd = _command(router_options, "cmd", where)
    if not merged.get("model") and not foreign_cmd:
        raise ConfigError(f"{where}: model [{name}] has no 'model' key (path to a GGUF file)")
    foreign_bin = _command(router_options, "bin", where)
    if foreign_bin and foreign_cmd:
        raise ConfigError(f"{where}: model [{name}] has both bin and cmd; choose one")
    check_endpoint = router_options.get("check-endpoint", "/health")
    if not check_endpoint.startswith("/"):
        raise ConfigError(f"{where}: check-endpoint must be a path starting with /")
    return ModelSpec(
        name=name, source=source, options=merged, foreign_bin=foreign_bin, foreign_cmd=foreign_cmd,
        check_endpoint=check_endpoint,
        load_timeout_s=_seconds(router_options, "load-timeout", 600.0, where),
        pinned=parse_bool(router_options.get("pin", "false"), where),
        ttl_s=_seconds(router_options, "ttl", -1.0, where) if "ttl" in router_options else None,
        aliases=_split_list(merged.get("alias")), tags=_split_list(merged.get("tags")),
        load_on_startup=parse_bool(router_options.get("load-on-startup", "false"), where),
        stop_timeout_s=_seconds(router_options, "stop-timeout", settings.stop_timeout_s, where),
        preset_ini=render_ini(name, {k: v for k, v in merged.items() if k not in _NOT_RENDERED},
                              router_options),
    )


def _resolve_relative(value: str, base: Path) -> str:
    """A relative model path is taken from the preset file's folder, wherever the router was
    started (never from the working directory: the same preset must mean the same file)."""
    if value.startswith("pkg:") or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def specs_from_preset(preset: PresetFile, settings: RouterSettings) -> list[ModelSpec]:
    specs = []
    base = preset.path.resolve().parent
    for section in preset.sections:
        options = {**preset.global_section.options, **section.options}
        router_options = {**preset.global_section.router_options, **section.router_options}
        for key in PATH_OPTIONS:
            if isinstance(options.get(key), str):
                options[key] = _resolve_relative(str(options[key]), base)
        specs.append(_make_spec(section.name, SOURCE_PRESET, options, router_options, settings,
                                f"{preset.path}:{section.line}"))
    return specs


def _gguf_in_folder(folder: Path) -> tuple[Path | None, Path | None]:
    """(main model file, projector file) of a model sub-folder."""
    names = sorted(path.name for path in folder.glob("*.gguf"))
    main = next((name for name in names if is_main_gguf(name)), None)
    projector = pick_projector(names)
    return (folder / main if main else None), (folder / projector if projector else None)


def specs_from_models_dir(folder: str, settings: RouterSettings,
                          global_options: dict[str, str | bool] | None = None) -> list[ModelSpec]:
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--models-dir {folder} is not a folder")
    specs = []
    for entry in sorted(root.iterdir()):
        options: dict[str, str | bool] = dict(global_options or {})
        if entry.is_file() and is_main_gguf(entry.name):
            name = strip_shard(entry.name).removesuffix(".gguf")
            options["model"] = str(entry.resolve())
        elif entry.is_dir():
            main, projector = _gguf_in_folder(entry)
            if main is None:
                continue
            name = entry.name
            options["model"] = str(main.resolve())
            if projector is not None:
                options["mmproj"] = str(projector.resolve())
        else:
            continue
        specs.append(_make_spec(name, SOURCE_MODELS_DIR, options, {}, settings, str(entry)))
    return specs


def specs_from_hf_cache(settings: RouterSettings,
                        global_options: dict[str, str | bool] | None = None) -> list[ModelSpec]:
    specs = []
    for cached in list_cached_models():
        options: dict[str, str | bool] = {**(global_options or {}), "model": cached.model_path}
        if cached.projector_path:
            options["mmproj"] = cached.projector_path
        specs.append(_make_spec(cached.name, SOURCE_CACHE, options, {}, settings, f"HF cache {cached.repo_id}"))
    return specs


def collect_specs(settings: RouterSettings) -> list[ModelSpec]:
    """Every model the router serves. For one name: preset over models-dir over the HF cache."""
    by_name: dict[str, ModelSpec] = {}
    preset = load_preset_file(settings.models_preset) if settings.models_preset else None
    for spec in specs_from_hf_cache(settings, preset.global_section.options if preset else None):
        by_name[spec.name] = spec
    if settings.models_dir:
        global_options = preset.global_section.options if preset else None
        for spec in specs_from_models_dir(settings.models_dir, settings, global_options):
            by_name[spec.name] = spec
    if preset is not None:
        for spec in specs_from_preset(preset, settings):
            by_name[spec.name] = spec
    _check_names(list(by_name.values()))
    return list(by_name.values())


def _check_names(specs: list[ModelSpec]) -> None:
    owner: dict[str, str] = {spec.name: spec.name for spec in specs}
    for spec in specs:
        for alias in spec.aliases:
            if alias in owner and owner[alias] != spec.name:
                raise ConfigError(f"alias '{alias}' of model '{spec.name}' conflicts with model "
                                  f"'{owner[alias]}'")
            owner[alias] = spec.name
