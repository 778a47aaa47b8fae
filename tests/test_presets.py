"""Preset INI parsing, model sources and the protocol/status tables (no processes needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from child.protocol import ChildState, ProtocolError, encode_state, parse_child_line
from router.errors import ConfigError
from router.model_sources import collect_specs, specs_from_models_dir
from router.model_status import InvalidTransition, ModelStatus, check_transition
from router.presets import load_preset_file, parse_preset_text
from router.settings import RouterSettings, settings_from_args

GOOD = """\
version = 1
; comment
[*]
c = 4096
LLAMA_ARG_THREADS = 2

[smollm2]
model = /models/smol.gguf
alias = small, chat
load-on-startup = true
stop-timeout = 3
jinja = true

[other]
m = other.gguf
ctx-size = 1024
"""


def test_preset_parsing_reads_sections_globals_and_short_names(tmp_path: Path) -> None:
    preset = parse_preset_text(GOOD, tmp_path / "p.ini")
    assert preset.global_section.options == {"ctx-size": "4096", "threads": "2"}
    names = [s.name for s in preset.sections]
    assert names == ["smollm2", "other"]
    smol = preset.sections[0]
    assert smol.options["model"] == "/models/smol.gguf"
    assert smol.options["jinja"] is True
    assert smol.router_options == {"load-on-startup": "true", "stop-timeout": "3"}
    assert preset.sections[1].options == {"model": "other.gguf", "ctx-size": "1024"}


def test_preset_precedence_router_flags_over_section_over_global(tmp_path: Path) -> None:
    path = tmp_path / "p.ini"
    path.write_text(GOOD)
    settings, _ = settings_from_args(["--models-preset", str(path), "-t", "7"])
    specs = {s.name: s for s in collect_specs(settings)}
    smol, other = specs["smollm2"], specs["other"]
    assert smol.options["ctx-size"] == "4096"  # from [*]
    assert other.options["ctx-size"] == "1024"  # the section wins over [*]
    assert smol.options["threads"] == "7" and other.options["threads"] == "7"  # the command line wins
    assert smol.aliases == ("small", "chat")
    assert smol.load_on_startup and not other.load_on_startup
    assert smol.stop_timeout_s == 3.0 and other.stop_timeout_s == 10.0
    # A relative model path is taken from the preset file's folder.
    assert other.options["model"] == str(tmp_path / "other.gguf")
    args = smol.child_args()
    assert args[args.index("--ctx-size") + 1] == "4096" and "--jinja" in args
    assert "--alias" not in args


@pytest.mark.parametrize(("text", "line", "key"), [
    ("[a]\nmodel = x.gguf\nctx-sise = 4\n", 3, "ctx-sise"),
    ("version = 1\n[*]\nbogus_key = 1\n", 3, "bogus_key"),
    ("[a]\nmodel = x\n\n\nLLAMA_ARG_NOPE = 1\n", 5, "LLAMA_ARG_NOPE"),
])
def test_preset_unknown_key_names_file_line_and_key(tmp_path: Path, text: str, line: int, key: str) -> None:
    path = tmp_path / "bad.ini"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_preset_file(path)
    assert f"{path}:{line}" in str(info.value)
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize(("text", "fragment"), [
    ("[a\nmodel = x\n", "missing its ']'"),
    ("[a]\nmodel x\n", "expected 'key = value'"),
    ("[a]\nmodel = x\n[a]\nmodel = y\n", "appears twice"),
    ("version = 2\n", "unsupported preset version"),
    ("[a]\nmodel = x\njinja = maybe\n", "expected true or false"),
])
def test_preset_malformed_files_are_refused(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_preset_text(text, tmp_path / "bad.ini")


def test_preset_model_without_path_and_alias_conflicts_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.ini"
    path.write_text("[a]\nc = 5\n")
    with pytest.raises(ConfigError, match="has no 'model' key"):
        collect_specs(RouterSettings(models_preset=str(path)))
    path.write_text("[a]\nmodel = /x.gguf\n[b]\nmodel = /y.gguf\nalias = a\n")
    with pytest.raises(ConfigError, match="alias 'a' of model 'b' conflicts"):
        collect_specs(RouterSettings(models_preset=str(path)))


def test_preset_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read preset file"):
        load_preset_file(tmp_path / "nope.ini")


def test_models_dir_lists_files_folders_shards_and_projectors(tmp_path: Path) -> None:
    (tmp_path / "alpha.gguf").write_bytes(b"x")
    (tmp_path / "mmproj-alpha.gguf").write_bytes(b"x")
    (tmp_path / "big-00001-of-00002.gguf").write_bytes(b"x")
    (tmp_path / "big-00002-of-00002.gguf").write_bytes(b"x")
    vision = tmp_path / "vision"
    vision.mkdir()
    (vision / "model-q4.gguf").write_bytes(b"x")
    (vision / "mmproj-f16.gguf").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a model")
    specs = {s.name: s for s in specs_from_models_dir(str(tmp_path), RouterSettings())}
    assert set(specs) == {"alpha", "big", "vision"}
    assert specs["big"].options["model"].endswith("big-00001-of-00002.gguf")
    assert specs["vision"].options["model"].endswith("model-q4.gguf")
    assert specs["vision"].options["mmproj"].endswith("mmproj-f16.gguf")
    assert all(s.source == "models_dir" for s in specs.values())


def test_protocol_lines_round_trip_and_malformed_lines_raise() -> None:
    line = encode_state(ChildState.READY, {"port": 1234})
    message = parse_child_line(line + "\n")
    assert message is not None and message.state == ChildState.READY and message.payload == {"port": 1234}
    assert parse_child_line("llama_model_loader: some log") is None
    for bad in ("cmd_child_to_router:state:{oops", 'cmd_child_to_router:state:{"state":"flying"}',
                "cmd_child_to_router:state:[1]"):
        with pytest.raises(ProtocolError):
            parse_child_line(bad)


def test_status_transitions_follow_the_diagram() -> None:
    allowed = [("unloaded", "loading"), ("loading", "loaded"), ("loading", "unloaded"),
               ("loaded", "sleeping"), ("sleeping", "loaded"), ("loaded", "unloaded"),
               ("sleeping", "unloaded"), ("loading", "loading"), ("downloading", "unloaded"),
               ("unloaded", "downloading"), ("downloading", "downloading")]
    for old, new in allowed:
        check_transition(ModelStatus(old), ModelStatus(new))
    for old, new in [("unloaded", "loaded"), ("unloaded", "sleeping"), ("loaded", "loading"),
                     ("sleeping", "loading"), ("unloaded", "unloaded"), ("downloading", "loading"),
                     ("loaded", "downloading"), ("downloading", "loaded")]:
        with pytest.raises(InvalidTransition):
            check_transition(ModelStatus(old), ModelStatus(new))


def test_preset_example_file_uses_every_key_validly() -> None:
    path = Path(__file__).resolve().parent.parent / "presets" / "example.ini"
    specs = {s.name: s for s in collect_specs(RouterSettings(models_preset=str(path)))}
    assert set(specs) == {"chat", "base", "llama-cpp", "any-server", "from-hub"}
    assert specs["chat"].pinned and specs["chat"].load_on_startup and specs["chat"].tags == ("chat", "english")
    assert specs["base"].ttl_s == 300 and specs["base"].options["ctx-size"] == "4096"
    assert specs["llama-cpp"].foreign_bin == ("/usr/local/bin/llama-server",)
    assert specs["any-server"].foreign_cmd[:2] == ("modelyard-child", "-m")
    assert not specs["any-server"].speaks_protocol and specs["any-server"].load_timeout_s == 120
    assert specs["from-hub"].hf_repo == "bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M"


def test_preset_default_file_serves_the_two_bundled_models() -> None:
    path = Path(__file__).resolve().parent.parent / "presets" / "default.ini"
    specs = {s.name: s for s in collect_specs(RouterSettings(models_preset=str(path)))}
    assert set(specs) == {"smollm2", "gemma3-270m"}
    assert specs["smollm2"].load_on_startup
    assert specs["gemma3-270m"].options["chat-template"] == "gemma"


def test_preset_llama_server_keys_pass_to_the_child(tmp_path: Path) -> None:
    path = tmp_path / "llama.ini"
    path.write_text("version = 1\n[*]\nmodels-max = 2\ncache-ram = 0\nno-slots = true\n"
                    "[a]\nmodel = x.gguf\nLLAMA_ARG_CACHE_TYPE_K = q8_0\ncontrol-vector-layer-range = 1 4\n")
    preset = load_preset_file(path)
    section = preset.sections[0]
    assert section.options["cache-type-k"] == "q8_0"
    assert section.options["control-vector-layer-range"] == "1 4"
    assert preset.global_section.options == {"cache-ram": "0", "no-slots": True}  # models-max: the router's


@pytest.mark.parametrize(("argv", "child_args"), [
    (["-nkvo", "-nr", "-nocb"], {"no-kv-offload": True, "no-repack": True, "no-cont-batching": True}),
    (["--predict", "7"], {"n-predict": "7"}),  # another spelling of one of the child's own flags
    (["-ctk=q8_0", "-n", "-1"], {"cache-type-k": "q8_0", "n-predict": "-1"}),
    (["--fit", "on", "--no-slots"], {"fit": "on", "no-slots": True}),
    (["-hft", "SECRET"], {}),  # the router's own --hf-token, never a child's
])
def test_preset_router_command_line_llama_server_flags(argv: list[str], child_args: dict[str, object]) -> None:
    from router.settings import settings_from_args

    settings, _ = settings_from_args(argv)
    assert settings.global_child_args == child_args
    assert settings.hf_token == ("SECRET" if "-hft" in argv else None)


@pytest.mark.parametrize(("argv", "message"), [
    (["-m", "x.gguf"], "each model's file and name come from presets or --models-dir"),
    (["--alias", "x"], "each model's file and name come from presets or --models-dir"),
    (["--hf-repo", "user/repo"], "each model's file and name come from presets or --models-dir"),
    (["--ssl-key-file", "k.pem"], "--ssl-key-file is a llama-server option this router does not have"),
    (["--fit", "--no-slots"], "--fit expects 1 value(s)"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_preset_router_command_line_refusals(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from router.settings import settings_from_args

    with pytest.raises(SystemExit) as info:
        settings_from_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_preset_server_options_in_a_section_never_reach_the_child(tmp_path: Path) -> None:
    path = tmp_path / "secret.ini"
    path.write_text("[*]\nhf-token = SECRET\napi-key = k\nssl-key-file = k.pem\n[a]\nmodel = x.gguf\n")
    preset = load_preset_file(path)
    assert preset.global_section.options == {} and preset.sections[0].options == {"model": "x.gguf"}


def test_preset_api_keys_skip_comments_and_an_empty_list(tmp_path: Path) -> None:
    from router.settings import settings_from_args

    keys = tmp_path / "keys.txt"
    keys.write_bytes("\ufeffalpha\r\n# the production keys\r\nbeta\r\n".encode())
    settings, _ = settings_from_args(["--api-key-file", str(keys)])
    assert settings.api_keys == ("alpha", "beta")
    with pytest.raises(ConfigError, match="--api-key holds no key"):
        settings_from_args(["--api-key", " , "])
