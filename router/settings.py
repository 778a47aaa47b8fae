"""The router's settings: llama-server's router flags, their LLAMA_ARG_* variables and defaults.

Flags that belong to the child (`-c`, `-t`, `--temp`, ...) may also be given to the router; they
apply to every model and win over the presets (router command line > model section > [*]).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pydantic import BaseModel, Field

from child.arguments import CHILD_ARGS, ArgSpec
from child.foreign_flags import UnknownFlag, as_options, extract_foreign
from router.default_preset import default_preset_path
from router.errors import ConfigError

# Child flags that the router sets itself for each child; not accepted as global overrides.
ROUTER_OWNED_CHILD_FLAGS = {"model", "host", "port", "alias"}


class RouterSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8080
    models_preset: str | None = None
    models_dir: str | None = None
    models_max: int = Field(default=4, ge=0)  # 0 = unlimited
    models_autoload: bool = True
    api_keys: tuple[str, ...] = ()  # any of them opens every route but /health; none: no key needed
    timeout_s: float = 3600.0  # read timeout for a proxied request
    models_queue: int = Field(default=64, ge=0)  # loads waiting for room before 503
    models_ttl_s: float = -1.0  # idle seconds before a model is unloaded; -1 = never
    memory_reserve_mb: float = 512.0  # kept free when admitting a model
    models_memory_mb: float = 0.0  # a fixed budget for all children together; 0 = what psutil says
    hf_token: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    cors_origins: list[str] = Field(default_factory=list)  # empty: no CORS headers at all
    stop_timeout_s: float = 10.0  # exit command -> SIGKILL of the child's process group
    reload_grace_s: float = 60.0  # requests in flight when a reload stops their model get this long
    child_connect_timeout_s: float = 10.0
    sse_ping_interval_s: float = 15.0
    sse_queue_size: int = 1024
    global_child_args: dict[str, str | bool] = Field(default_factory=dict)
    peers: tuple[str, ...] = ()  # other routers, `URL` or `name=URL` (router/peers.py)
    peers_api_key: str | None = None  # sent to peers; None: this router's own first key
    peers_resolve_s: float = 10.0  # a peer given by host name is looked up again this often


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_bool(name: str, default: bool) -> bool:
    value = _env(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "on", "yes", "enabled")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelyard",
        description="Serve many local GGUF models behind one OpenAI-compatible endpoint.",
        allow_abbrev=False,  # else `-m x.gguf` would be taken for `-mm` (--mmproj), and so on
    )
    router = parser.add_argument_group("router")
    router.add_argument("--host", default=_env("LLAMA_ARG_HOST", "127.0.0.1"))
    router.add_argument("--port", type=int, default=int(_env("LLAMA_ARG_PORT", "8080") or 8080),
                        help="0 picks a free port (printed at start)")
    router.add_argument("--models-preset", default=_env("LLAMA_ARG_MODELS_PRESET"),
                        help="preset INI file (llama.cpp format)")
    router.add_argument("--models-dir", default=_env("LLAMA_ARG_MODELS_DIR"),
                        help="folder of GGUF files, one model per file or sub-folder")
    router.add_argument("--no-default-preset", dest="default_preset", action="store_false",
                        default=not _env_bool("MODELYARD_NO_DEFAULT_PRESET", False),
                        help="without --models-preset and --models-dir, serve only the Hugging Face cache "
                             "(as llama.cpp's router) instead of the packaged default preset")
    router.add_argument("--models-max", type=int, default=int(_env("LLAMA_ARG_MODELS_MAX", "4") or 4),
                        help="models resident at once, 0 = unlimited; the least recently used idle one "
                             "is unloaded to make room")
    router.add_argument("--models-autoload", dest="models_autoload", action="store_true",
                        default=_env_bool("LLAMA_ARG_MODELS_AUTOLOAD", True))
    router.add_argument("--no-models-autoload", dest="models_autoload", action="store_false")
    router.add_argument("--api-key", default=_env("LLAMA_API_KEY"))
    router.add_argument("--api-key-file", default=_env("LLAMA_ARG_API_KEY_FILE"))
    router.add_argument("--timeout", "-to", type=float, default=float(_env("LLAMA_ARG_TIMEOUT", "3600") or 3600),
                        help="seconds a proxied request may wait for the child")
    router.add_argument("--models-queue", type=int, default=int(_env("LLAMA_ARG_MODELS_QUEUE", "64") or 64),
                        help="requests that may wait for a model to get room before 503")
    router.add_argument("--models-ttl", "--stop-idle-seconds", dest="models_ttl", type=float,
                        default=float(_env("LLAMA_ARG_MODELS_TTL", "") or _env("LLAMA_ARG_STOP_IDLE_SECONDS", "-1")
                                      or -1),
                        help="unload a model after this many idle seconds; -1 = never (preset key: ttl); "
                             "--stop-idle-seconds is llama.cpp's name for it")
    router.add_argument("--memory-reserve-mb", type=float,
                        default=float(_env("MODELYARD_MEMORY_RESERVE_MB", "512") or 512),
                        help="memory kept free when admitting a model")
    router.add_argument("--models-memory-mb", type=float,
                        default=float(_env("MODELYARD_MODELS_MEMORY_MB", "0") or 0),
                        help="memory budget for all children together (estimated sizes); 0 = use the "
                             "machine's available memory less --memory-reserve-mb")
    router.add_argument("--hf-token", default=_env("HF_TOKEN"))
    router.add_argument("--max-body-bytes", type=int,
                        default=int(_env("MODELYARD_MAX_BODY_BYTES", str(16 * 1024 * 1024)) or 0),
                        help="larger request bodies get 413")
    router.add_argument("--cors-origins", default=_env("MODELYARD_CORS_ORIGINS", ""),
                        help="comma-separated origins allowed by CORS ('*' for any); default: CORS off")
    router.add_argument("--reload-grace-seconds", type=float,
                        default=float(_env("MODELYARD_RELOAD_GRACE_SECONDS", "60") or 60),
                        help="when ?reload=1 stops or restarts a model, how long its requests in flight may run on")
    router.add_argument("--peers", default=_env("MODELYARD_PEERS", ""),
                        help="other modelyard routers whose models this one serves too: comma-separated "
                             "URL or name=URL (http://host:port); a host name is every address it resolves to")
    router.add_argument("--peers-api-key", default=_env("MODELYARD_PEERS_API_KEY"),
                        help="the key sent to peers (default: this router's own first --api-key)")
    router.add_argument("--peers-resolve-seconds", type=float,
                        default=float(_env("MODELYARD_PEERS_RESOLVE_SECONDS", "10") or 10),
                        help="how often a peer's host name is resolved again")
    router.add_argument("--log-level", default=_env("MODELYARD_LOG_LEVEL", "info"))

    child = parser.add_argument_group("model defaults (passed to every child)")
    for spec in CHILD_ARGS:
        if spec.long in ROUTER_OWNED_CHILD_FLAGS:
            continue
        if spec.takes_value:
            child.add_argument(*spec.names, dest=f"child__{spec.dest}", default=argparse.SUPPRESS,
                               choices=spec.choices, help=spec.help)
        else:
            child.add_argument(*spec.names, dest=f"child__{spec.dest}", action="store_true",
                               default=argparse.SUPPRESS, help=spec.help)
    return parser


def _spec_by_dest(dest: str) -> ArgSpec:
    return next(s for s in CHILD_ARGS if s.dest == dest)


def settings_from_args(argv: list[str] | None = None) -> tuple[RouterSettings, str]:
    """Parse the command line; return the settings and the log level."""
    parser = build_parser()
    # Like llama.cpp's router: any llama-server flag the router does not know goes to every child
    # as given (modelyard's child names those it has no use for in its log).
    # The child flags the router sets itself (-m, --alias, ...) stay "own": argparse refuses them.
    own = set(parser._option_string_actions) | {name for spec in CHILD_ARGS for name in spec.names}
    try:
        rest, foreign = extract_foreign(list(sys.argv[1:] if argv is None else argv), own, "this router")
    except UnknownFlag as exc:
        parser.error(str(exc))
    # A model's own file or name has no place here (and argparse would take `-m` for a prefix of
    # `-mm`, --mmproj).
    per_model = {name for spec in CHILD_ARGS if spec.long in ("model", "alias") for name in spec.names}
    given = next((f"--{f.long}" for f, _ in foreign if f.long in ("hf-repo", "hf-file", "model-url", "docker-repo")),
                 None) or next((t for t in rest if t.partition("=")[0] in per_model), None)
    if given:
        parser.error(f"{given}: each model's file and name come from presets or --models-dir")
    args = parser.parse_args(rest)
    # As llama-server: --api-key is a comma-separated list, --api-key-file adds one key a line.
    api_keys = [k.strip() for k in (args.api_key or "").split(",") if k.strip()]
    if args.api_key is not None and not api_keys:
        raise ConfigError("--api-key holds no key")
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8-sig").splitlines()
            from_file = [k.strip() for k in lines if k.strip() and not k.strip().startswith("#")]  # comments
        except OSError as exc:
            raise ConfigError(f"cannot read --api-key-file {args.api_key_file}: {exc}") from exc
        if not from_file:
            raise ConfigError(f"--api-key-file {args.api_key_file} holds no key")
        api_keys += from_file
    child_args: dict[str, str | bool] = {}
    for key, value in vars(args).items():
        if key.startswith("child__"):
            spec = _spec_by_dest(key.removeprefix("child__"))
            child_args[spec.long] = value if isinstance(value, bool) else str(value)
    child_args.update(as_options(foreign))
    sleep = child_args.get("sleep-idle-seconds")
    env_sleep = _env("LLAMA_ARG_SLEEP_IDLE_SECONDS")
    if sleep is None and env_sleep is not None:
        child_args["sleep-idle-seconds"] = env_sleep
    peers = tuple(p.strip() for p in str(args.peers or "").split(",") if p.strip())
    if args.peers_resolve_seconds <= 0:
        raise ConfigError("--peers-resolve-seconds must be more than 0")
    models_preset = args.models_preset
    # A front router (peers, nothing of its own) does not start the default preset's model.
    if models_preset is None and args.models_dir is None and args.default_preset and not peers:
        models_preset = str(default_preset_path())  # a bare `modelyard` serves something
    settings = RouterSettings(
        host=args.host,
        port=args.port,
        models_preset=models_preset,
        models_dir=args.models_dir,
        models_max=args.models_max,
        models_autoload=args.models_autoload,
        api_keys=tuple(dict.fromkeys(api_keys)),
        timeout_s=args.timeout,
        models_queue=args.models_queue,
        models_ttl_s=args.models_ttl,
        memory_reserve_mb=args.memory_reserve_mb,
        models_memory_mb=args.models_memory_mb,
        hf_token=args.hf_token,
        max_body_bytes=args.max_body_bytes,
        reload_grace_s=args.reload_grace_seconds,
        cors_origins=[o.strip() for o in str(args.cors_origins).split(",") if o.strip()],
        global_child_args=child_args,
        peers=peers,
        peers_api_key=args.peers_api_key,
        peers_resolve_s=args.peers_resolve_seconds,
    )
    return settings, args.log_level
