"""Where models come from: preset sections, a --models-dir folder, and the router's own flags.

Each source yields ModelSpecs; precedence of options is router command line > model section >
[*] (as llama.cpp's router). A model's child command line is rendered from its options.
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from child.foreign_flags import foreign_flag
from child.protocol import ROUTER_PORT_ENV
from router.errors import ConfigError
from router.gguf_files import is_main_gguf, pick_projector, strip_shard
from router.hf_cache import list_cached_models, parse_reference
from router.presets import GLOBAL_SECTION, PresetFile, PresetSection, load_preset_file, parse_bool, render_ini
from router.settings import RouterSettings
from router.upstream import bearer, parse_base_url

log = logging.getLogger(__name__)

SOURCE_PRESET = "preset"
SOURCE_MODELS_DIR = "models_dir"
SOURCE_CACHE = "cache"
SOURCE_REMOTE = "remote"  # a preset section with `url =`
SOURCE_PEER = "peer"  # a model of a peer router (router/peers.py)

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
    env: tuple[tuple[str, str], ...] = ()  # set in the child's environment, over the router's
    concurrency_limit: int = 0  # requests in flight at most, beyond it a 429; 0: no limit
    unlisted: bool = False  # served, but not in /models
    # llama-server's -hf / -hff: `user/repo[:quant]` and a file in it, downloaded into the Hugging
    # Face cache on the first load (router/downloads.py); empty for a model with its own file.
    hf_repo: str = ""
    hf_file: str = ""
    # A remote model's server root (`url =`), the key it wants (never shown), its name for the
    # model there (empty: the client's), and the seconds between its health checks.
    remote_url: str = ""
    api_key: str = field(default="", repr=False)
    use_model_name: str = ""
    check_interval_s: float = 5.0
    peer: str = ""  # the peer router a SOURCE_PEER model belongs to
    peer_model: str = ""  # that model's name on the peer

    @property
    def served_name(self) -> str:
        """The name requests use to reach this model and its replicas: a peer's model is its
        name there; a remote section `name@where` is a replica of `name`."""
        if self.peer_model:
            return self.peer_model
        if self.remote_url and "@" in self.name:
            return self.name.rpartition("@")[0]
        return self.name

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


# `env = A=1, B=x,y`: a comma starts a new variable only where a NAME= follows it.
_ENV_SPLIT = re.compile(r",\s*(?=[A-Za-z_][A-Za-z0-9_]*=)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env(value: str, where: str) -> dict[str, str]:
    variables: dict[str, str] = {}
    for item in _ENV_SPLIT.split(value.strip()):
        name, equals, text = item.strip().partition("=")
        if not equals or not _ENV_NAME.fullmatch(name.strip()):
            raise ConfigError(f"{where}: env: expected NAME=value, got {item.strip()!r}")
        if name.strip() == ROUTER_PORT_ENV:
            raise ConfigError(f"{where}: env: {ROUTER_PORT_ENV} is set by the router itself")
        variables[name.strip()] = text.strip()
    return variables


def _check_endpoint(router_options: dict[str, str], where: str) -> str:
    check_endpoint = router_options.get("check-endpoint", "/health")
    if not check_endpoint.startswith("/"):
        raise ConfigError(f"{where}: check-endpoint must be a path starting with /")
    return check_endpoint


def _count(router_options: dict[str, str], key: str, where: str) -> int:
    try:
        value = int(router_options.get(key, "0"))
    except ValueError as exc:
        raise ConfigError(f"{where}: {key} must be a whole number") from exc
    if value < 0:
        raise ConfigError(f"{where}: {key} must not be negative")
    return value


def _make_spec(name: str, source: str, options: dict[str, str | bool], router_options: dict[str, str],
               settings: RouterSettings, where: str, env: dict[str, str] | None = None) -> ModelSpec:
    if "url" in router_options:
        return _remote_spec(name, options, router_options, where)
    if "use-model-name" in router_options:
        raise ConfigError(f"{where}: model [{name}]: use-model-name is for a remote model (url =)")
    if "api-key" in router_options:  # llama-server's server-wide flag: meaningless for one child
        log.warning("%s: 'api-key' is a router option, not a model's: ignored here (give it on the command line)",
                    where)
        router_options = {k: v for k, v in router_options.items() if k != "api-key"}
    merged = {**options, **settings.global_child_args}
    foreign_cmd = _command(router_options, "cmd", where)
    hf_repo, hf_file = _hf_source(name, merged, router_options, where)
    if not merged.get("model") and not foreign_cmd and not hf_repo:
        raise ConfigError(f"{where}: model [{name}] has no 'model' key (path to a GGUF file) nor 'hf-repo'")
    foreign_bin = _command(router_options, "bin", where)
    if foreign_bin and foreign_cmd:
        raise ConfigError(f"{where}: model [{name}] has both bin and cmd; choose one")
    return ModelSpec(
        name=name, source=source, options=merged, foreign_bin=foreign_bin, foreign_cmd=foreign_cmd,
        check_endpoint=_check_endpoint(router_options, where),
        load_timeout_s=_seconds(router_options, "load-timeout", 600.0, where),
        pinned=parse_bool(router_options.get("pin", "false"), where),
        ttl_s=_seconds(router_options, "ttl", -1.0, where) if "ttl" in router_options else None,
        aliases=_split_list(merged.get("alias")), tags=_split_list(merged.get("tags")),
        load_on_startup=parse_bool(router_options.get("load-on-startup", "false"), where),
        stop_timeout_s=_seconds(router_options, "stop-timeout", settings.stop_timeout_s, where),
        env=tuple((env or {}).items()),
        concurrency_limit=_count(router_options, "concurrency-limit", where),
        unlisted=parse_bool(router_options.get("unlisted", "false"), where),
        hf_repo=hf_repo, hf_file=hf_file,
        preset_ini=render_ini(name, {k: v for k, v in merged.items() if k not in _NOT_RENDERED},
                              router_options),
    )


# What a remote model's section may hold besides its url: nothing is spawned, so no child flag.
_REMOTE_KEYS = {"url", "api-key", "use-model-name", "check-endpoint", "check-interval", "alias", "tags",
                "concurrency-limit", "unlisted"}


def _remote_spec(name: str, options: dict[str, str | bool], router_options: dict[str, str],
                 where: str) -> ModelSpec:
    """A preset section with `url =`: a server the router reaches but never starts."""
    url = router_options["url"].strip()
    parse_base_url(url, f"{where}: url")
    bearer(router_options.get("api-key", "").strip(), f"{where}: api-key")  # refused here if it cannot be sent
    # [*]'s child flags (c = 4096, say) apply to the router's children, not to a remote server.
    own = {k: v for k, v in options.items() if k in _REMOTE_KEYS}
    stray = sorted({"cmd", "bin", "hf-repo", "hf-file"} & set(router_options) | {"model"} & set(options))
    if stray:
        raise ConfigError(f"{where}: model [{name}] has url: {', '.join(stray)} mean nothing for a remote model")
    interval = _seconds(router_options, "check-interval", 5.0, where)
    if interval <= 0:
        raise ConfigError(f"{where}: check-interval must be more than 0 seconds")
    return ModelSpec(
        name=name, source=SOURCE_REMOTE, options=own, check_endpoint=_check_endpoint(router_options, where),
        aliases=_split_list(own.get("alias")), tags=_split_list(own.get("tags")),
        concurrency_limit=_count(router_options, "concurrency-limit", where),
        unlisted=parse_bool(router_options.get("unlisted", "false"), where),
        remote_url=url.rstrip("/"), api_key=router_options.get("api-key", "").strip(),
        use_model_name=router_options.get("use-model-name", "").strip(), check_interval_s=interval,
        preset_ini=render_ini(name, {k: v for k, v in own.items() if k not in _NOT_RENDERED}, router_options),
    )


_warned_model_wins: set[tuple[str, str]] = set()


def _hf_source(name: str, options: dict[str, str | bool], router_options: dict[str, str],
               where: str) -> tuple[str, str]:
    """(hf-repo, hf-file) of a section, checked; ("", "") when the model has a file of its own."""
    hf_repo = router_options.get("hf-repo", "").strip()
    hf_file = router_options.get("hf-file", "").strip()
    if hf_file and not hf_repo:
        raise ConfigError(f"{where}: model [{name}] has hf-file but no hf-repo to take it from")
    if not hf_repo:
        return "", ""
    try:
        parse_reference(hf_repo)
    except ValueError as exc:
        raise ConfigError(f"{where}: hf-repo: {exc}") from exc
    if hf_file and (hf_file.startswith("/") or ".." in hf_file.split("/")):
        raise ConfigError(f"{where}: hf-file must be a file's path inside the repository, got {hf_file!r}")
    if options.get("model"):
        if (where, name) not in _warned_model_wins:  # once, not on every reload
            _warned_model_wins.add((where, name))
            log.warning("%s: model [%s] has both 'model' and 'hf-repo': 'model' wins, nothing is downloaded",
                        where, name)
        return "", ""
    return hf_repo, hf_file


def _resolve_relative(value: str, base: Path) -> str:
    """A relative model path is taken from the preset file's folder, wherever the router was
    started (never from the working directory: the same preset must mean the same file)."""
    if value.startswith("pkg:") or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _env_of(defaults: PresetSection, section: PresetSection | None, where: str) -> dict[str, str]:
    """[*]'s variables, then the section's on top (each `env` line adds, it does not replace)."""
    env = parse_env(defaults.router_options["env"], where) if "env" in defaults.router_options else {}
    if section is not None and "env" in section.router_options:
        env.update(parse_env(section.router_options["env"], f"{where} [{section.name}]"))
    return env


def specs_from_preset(preset: PresetFile, settings: RouterSettings,
                      found: dict[str, ModelSpec] | None = None) -> list[ModelSpec]:
    """The preset's models. A section with no model of its own that names a model found in
    --models-dir or the HF cache (`found`) gives that model its settings, as llama.cpp's router."""
    specs = []
    base = preset.path.resolve().parent
    defaults = preset.global_section
    for section in preset.sections:
        where = f"{preset.path}:{section.line}"
        options = {**defaults.options, **section.options}
        known = (found or {}).get(section.name)
        source = SOURCE_PRESET
        own_file = "model" in section.options or "cmd" in section.router_options or "hf-repo" in section.router_options
        if known is not None and not own_file:
            options = {**known.options, **section.options}
            source = known.source
        router_options = {**defaults.router_options, **section.router_options}
        for key in PATH_OPTIONS:
            if isinstance(options.get(key), str):
                options[key] = _resolve_relative(str(options[key]), base)
        specs.append(_make_spec(section.name, source, options, router_options, settings, where,
                                _env_of(defaults, section, where)))
    return specs


def _gguf_in_folder(folder: Path) -> tuple[Path | None, Path | None]:
    """(main model file, projector file) of a model sub-folder."""
    names = sorted(path.name for path in folder.glob("*.gguf"))
    main = next((name for name in names if is_main_gguf(name)), None)
    projector = pick_projector(names)
    return (folder / main if main else None), (folder / projector if projector else None)


def specs_from_models_dir(folder: str, settings: RouterSettings,
                          defaults: PresetSection | None = None) -> list[ModelSpec]:
    """One model per GGUF file or sub-folder; a preset's [*] applies to each."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--models-dir {folder} is not a folder")
    defaults = defaults or PresetSection(GLOBAL_SECTION, 0)
    specs = []
    for entry in sorted(root.iterdir()):
        options: dict[str, str | bool] = dict(defaults.options)
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
        specs.append(_make_spec(name, SOURCE_MODELS_DIR, options, dict(defaults.router_options), settings,
                                str(entry), _env_of(defaults, None, str(entry))))
    return specs


def specs_from_hf_cache(settings: RouterSettings, defaults: PresetSection | None = None) -> list[ModelSpec]:
    """The models downloaded into the Hugging Face cache; a preset's [*] applies to each."""
    defaults = defaults or PresetSection(GLOBAL_SECTION, 0)
    specs = []
    for cached in list_cached_models():
        options: dict[str, str | bool] = {**defaults.options, "model": cached.model_path}
        if cached.projector_path:
            options["mmproj"] = cached.projector_path
        where = f"HF cache {cached.repo_id}"
        specs.append(_make_spec(cached.name, SOURCE_CACHE, options, dict(defaults.router_options), settings,
                                where, _env_of(defaults, None, where)))
    return specs


def collect_specs(settings: RouterSettings) -> list[ModelSpec]:
    """Every model the router serves. For one name: preset over models-dir over the HF cache."""
    found: dict[str, ModelSpec] = {}
    preset = load_preset_file(settings.models_preset) if settings.models_preset else None
    defaults = preset.global_section if preset else None
    for spec in specs_from_hf_cache(settings, defaults):
        found[spec.name] = spec
    if settings.models_dir:
        for spec in specs_from_models_dir(settings.models_dir, settings, defaults):
            found[spec.name] = spec
    if preset is not None:
        for spec in specs_from_preset(preset, settings, dict(found)):
            found[spec.name] = spec
    _check_names(list(found.values()))
    return list(found.values())


def _check_names(specs: list[ModelSpec]) -> None:
    owner: dict[str, str] = {spec.name: spec.name for spec in specs}
    for spec in specs:
        for alias in spec.aliases:
            if alias in owner and owner[alias] != spec.name:
                raise ConfigError(f"alias '{alias}' of model '{spec.name}' conflicts with model "
                                  f"'{owner[alias]}'")
            owner[alias] = spec.name
