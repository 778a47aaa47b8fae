"""Beyond one machine: remote models, peer routers and replicas, all on 127.0.0.1.

Node routers serve real models (the tiny random-weight GGUF, SmolLM2); a front router has them as
peers. Everything goes through real HTTP between real router processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from router import peers as peer_links
from router.errors import ConfigError
from router.events import EventHub
from router.peers import Peers
from router.presets import parse_preset_text
from router.registry import Registry
from router.settings import RouterSettings
from router.upstream_client import UpstreamClient
from tests.conftest import EventFeed, RouterProcess, tiny_preset

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


def _port(router: RouterProcess) -> int:
    return int(router.url.rsplit(":", 1)[1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entries(router: RouterProcess) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in router.client.get("/models").json()["data"]}


def _wait(predicate: Any, what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _wait_entry(router: RouterProcess, name: str, status: str, timeout_s: float = 30.0) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        entry = _entries(router).get(name)
        return entry if entry is not None and entry["status"]["value"] == status else None
    return _wait(found, f"{name} {status} on {router.url}", timeout_s)  # type: ignore[no-any-return]


def test_three_routers_front_lists_loads_and_routes_each_model_to_its_node(
        start_router, tiny_model: Path, smollm2_model: Path) -> None:
    node_a = start_router(tiny_preset(tiny_model, ["tiny"]))
    node_b = start_router(f"version = 1\n[smol]\nmodel = {smollm2_model}\nc = 1024\nt = 1\n")
    front = start_router(None, "--peers", f"a={node_a.url},b={node_b.url}")
    listed = _wait_entry(front, "tiny@a", "unloaded")
    assert listed["source"] == "peer" and listed["peer"] == "a"
    assert _wait_entry(front, "smol@b", "unloaded")["peer"] == "b"
    # A load through the front starts the model on its node, and its status comes back.
    assert front.client.post("/models/load", json={"model": "tiny"}).json() == {"success": True}
    node_a.wait_status("tiny", "loaded")
    _wait_entry(front, "tiny@a", "loaded")
    assert node_b.status("smol") == "unloaded"
    # A chat for each model is answered by the right node (by plain name, or by name@peer).
    for name, node, served in (("tiny", node_a, "tiny"), ("smol@b", node_b, "smol")):
        answer = front.client.post("/v1/chat/completions", json={"model": name, **CHAT})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == served
        assert node.model_entry(served)["last_used"] is not None
    _wait_entry(front, "smol@b", "loaded")
    assert front.client.post("/v1/chat/completions", json={"model": "nope", **CHAT}).status_code == 400
    # An unload goes to the node too.
    assert front.client.post("/models/unload", json={"model": "smol@b"}).json() == {"success": True}
    node_b.wait_status("smol", "unloaded")
    _wait_entry(front, "smol@b", "unloaded")
    # The front's metrics have one series per upstream, with the peer.
    metrics = front.client.get("/metrics").text
    assert 'modelyard_router_in_flight{model="tiny@a",peer="a"}' in metrics


def test_replicas_spread_requests_and_a_conversation_sticks_to_its_replica(start_router, tiny_model: Path) -> None:
    node_a = start_router(tiny_preset(tiny_model, ["tiny"], extra="load-on-startup = true\n"))
    node_b = start_router(tiny_preset(tiny_model, ["tiny"], extra="load-on-startup = true\n"))
    front = start_router(None, "--peers", f"a={node_a.url},b={node_b.url}")
    _wait_entry(front, "tiny@a", "loaded")
    _wait_entry(front, "tiny@b", "loaded")
    body = {"model": "tiny", **CHAT, "max_tokens": 30, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: front.client.post("/v1/chat/completions", json=body), range(24)))
    assert all(a.status_code == 200 for a in answers)
    served = {name: _served(node) for name, node in (("a", node_a), ("b", node_b))}
    assert served["a"] >= 4 and served["b"] >= 4, served  # both replicas took a share
    # X-Conversation-Id sticks to the replica that owns the conversation.
    before = _served(node_a), _served(node_b)
    for _ in range(6):
        answer = front.client.post("/v1/chat/completions", json=body, headers={"X-Conversation-Id": "c1"})
        assert answer.status_code == 200
    after = _served(node_a), _served(node_b)
    assert sorted((after[0] - before[0], after[1] - before[1])) == [0, 6], (before, after)


def _served(node: RouterProcess) -> float:
    """Chat requests a node router answered with 200, from its own metrics."""
    for line in node.client.get("/metrics").text.splitlines():
        if line.startswith('modelyard_router_requests_total{code="200",model="tiny"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_resumable_stream_started_through_the_front_resumes_through_the_front(
        start_router, tiny_model: Path) -> None:
    node = start_router(tiny_preset(tiny_model, ["tiny"], np=1))
    front = start_router(None, "--peers", f"n={node.url}")
    _wait_entry(front, "tiny@n", "unloaded")
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 60, "ignore_eos": True, "stream": True, "temperature": 0}
    with front.client.stream("POST", "/v1/completions", json=body, headers={"X-Conversation-Id": "resume-1"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
    # The client left after one event; the node's child keeps generating. Lookup and replay
    # go through the front to the node that owns the conversation.
    found = _wait(lambda: [e for e in front.client.post("/v1/streams/lookup",
                                                          json={"conversation_ids": ["resume-1"]}).json()
                           if e.get("conversation_id") == "resume-1" and e.get("completed_at")],
                  "the stream to end on the node")
    assert found[0]["conversation_id"] == "resume-1"
    replay = front.client.get("/v1/stream", params={"conv_id": "resume-1"})
    assert replay.status_code == 200
    events = [line for line in replay.text.splitlines() if line.startswith("data: ")]
    assert events[0] == first and events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1] if '"choices"' in e)
    direct = node.client.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]["text"]
    assert text == direct
    assert front.client.delete("/v1/stream", params={"conv_id": "resume-1"}).status_code == 204
    assert front.client.get("/v1/stream", params={"conv_id": "resume-1"}).status_code == 404


def test_a_remote_model_follows_its_health_and_hides_its_key(start_router, tiny_model: Path) -> None:
    port = _free_port()
    node_args = ("--port", str(port), "--api-key", "node-secret")
    node = start_router(tiny_preset(tiny_model, ["tiny"]), *node_args)
    front = start_router(f"version = 1\n[tiny@box]\nurl = http://127.0.0.1:{port}\napi-key = node-secret\n"
                         "check-interval = 0.2\nuse-model-name = tiny\n", "--models-max", "1")
    entry = _wait_entry(front, "tiny@box", "loaded")
    assert entry["source"] == "remote" and entry["url"] == f"http://127.0.0.1:{port}"
    assert "node-secret" not in front.client.get("/models").text
    # Requests reach it by the section's name and by the name it replicates; the key goes along.
    for name in ("tiny", "tiny@box"):
        answer = front.client.post("/v1/chat/completions", json={"model": name, **CHAT})
        assert answer.status_code == 200, answer.text
    assert front.client.post("/models/unload", json={"model": "tiny@box"}).status_code == 400
    # The server goes: unloaded with the reason, on /models and on the feed; then back.
    feed = EventFeed(front.url)
    try:
        node.stop()
        down = feed.wait_for(lambda e: e["model"] == "tiny@box" and e["data"].get("status") == "unloaded")
        assert "127.0.0.1" in down["data"]["error"]
        entry = _wait_entry(front, "tiny@box", "unloaded")
        assert entry["status"]["failed"] is True and entry["status"]["error"]
        refused = front.client.post("/v1/chat/completions", json={"model": "tiny", **CHAT})
        assert refused.status_code == 503 and "tiny@box" in refused.json()["error"]["message"]
        assert front.client.get("/health").status_code == 200
        node = start_router(tiny_preset(tiny_model, ["tiny"]), *node_args)
        feed.wait_for(lambda e: e["model"] == "tiny@box" and e["data"].get("status") == "loaded")
        assert front.client.post("/v1/chat/completions", json={"model": "tiny", **CHAT}).status_code == 200
    finally:
        feed.close()
    assert "warning" in front.log_text().lower() and "remote model tiny@box" in front.log_text()


class FakePeer(BaseHTTPRequestHandler):
    """A 'peer' answering /models with `listing` and /models/sse with `feed` bytes (then it ends
    the feed, or holds it open with `hold_s`); it counts what it is asked."""

    listing: bytes = json.dumps({"data": [{"id": "ghost", "status": {"value": "loaded"}}]}).encode()
    feed: bytes = b"data: {this is not json\n\n"
    hold_s = 0.0
    later: tuple[float, bytes] | None = None  # (seconds, bytes) written to the feed after a while
    control_answer = b'{"error": {"message": "no", "type": "server_error"}}'
    asked: Counter[str]

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.asked[self.path.partition("?")[0]] += 1
        if self.path == "/models":
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(self.listing)))
            self.end_headers()
            self.wfile.write(self.listing)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        try:
            self.wfile.write(self.feed)
            self.wfile.flush()
            if self.later is not None:
                time.sleep(self.later[0])
                self.wfile.write(self.later[1])
                self.wfile.flush()
            time.sleep(self.hold_s)
        except OSError:
            pass
        self.close_connection = True

    def do_POST(self) -> None:  # noqa: N802 - a load or unload forwarded to this 'peer'
        self.asked[self.path] += 1
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(500)
        self.send_header("content-length", str(len(self.control_answer)))
        self.end_headers()
        self.wfile.write(self.control_answer)

    def log_message(self, *args: Any) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the router hung up on an answer it would not read whole: expected here


def _serve_peer(**behaviour: Any) -> tuple[str, Counter[str], ThreadingHTTPServer]:
    handler = type("Peer", (FakePeer,), {**behaviour, "asked": Counter()})
    server = _QuietServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", handler.asked, server


@pytest.fixture
def fake_peer() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def start(**behaviour: Any) -> tuple[str, Counter[str]]:
        url, asked, server = _serve_peer(**behaviour)
        servers.append(server)
        return url, asked

    start.handler_of = lambda url: next(s.RequestHandlerClass for s in servers  # type: ignore[attr-defined]
                                        if url.endswith(f":{s.server_address[1]}"))

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def garbage_peer(fake_peer: Any) -> str:
    return str(fake_peer()[0])


def test_peers_that_do_not_answer_or_answer_garbage_leave_the_front_healthy(
        start_router, tiny_model: Path, garbage_peer: str) -> None:
    silent = f"http://127.0.0.1:{_free_port()}"
    front = start_router(tiny_preset(tiny_model, ["local"]), "--peers", f"silent={silent},junk={garbage_peer}")
    assert front.client.get("/health").status_code == 200
    log = _wait(lambda: "peer silent unreachable" in front.log_text() and
                "peer junk unreachable" in front.log_text() and front.log_text(), "both peers' failures logged")
    assert "not a status event" in log
    # The garbage peer's model was listed, then turned unloaded with the reason; the local model serves.
    entry = _wait_entry(front, "ghost@junk", "unloaded")
    assert "not a status event" in entry["status"]["error"]
    assert front.client.post("/v1/chat/completions", json={"model": "local", **CHAT}).status_code == 200
    refused = front.client.post("/v1/chat/completions", json={"model": "ghost", **CHAT})
    assert refused.status_code == 503
    assert front.client.get("/health").status_code == 200


def test_the_api_key_works_across_peers(start_router, tiny_model: Path) -> None:
    node = start_router(tiny_preset(tiny_model, ["tiny"]), "--api-key", "k1")
    front = start_router(None, "--api-key", "k1", "--peers", node.url)
    name = f"tiny@127.0.0.1:{_port(node)}"
    headers = {"Authorization": "Bearer k1"}
    _wait(lambda: name in {e["id"] for e in httpx.get(front.url + "/models", headers=headers).json()["data"]},
          "the peer's model on the front")
    assert httpx.get(front.url + "/models").status_code == 401
    answer = httpx.post(front.url + "/v1/chat/completions", json={"model": "tiny", **CHAT}, headers=headers,
                        timeout=60)
    assert answer.status_code == 200, answer.text


def test_a_peer_that_restarts_turns_its_models_unloaded_and_back(start_router, tiny_model: Path) -> None:
    port = _free_port()
    preset = tiny_preset(tiny_model, ["tiny"], extra="load-on-startup = true\n")
    node = start_router(preset, "--port", str(port))
    front = start_router(None, "--peers", f"n=http://127.0.0.1:{port}")
    _wait_entry(front, "tiny@n", "loaded")
    node.proc.kill()  # SIGKILL: no goodbye on the feed
    entry = _wait_entry(front, "tiny@n", "unloaded")
    assert "peer n unreachable" in entry["status"]["error"]
    assert front.client.post("/v1/chat/completions", json={"model": "tiny", **CHAT}).status_code == 503
    node.stop()
    start_router(preset, "--port", str(port))
    _wait_entry(front, "tiny@n", "loaded", timeout_s=60)
    assert front.client.post("/v1/chat/completions", json={"model": "tiny", **CHAT}).status_code == 200


def test_preset_remote_and_peer_keys_are_checked(tmp_path: Path) -> None:
    from router.model_sources import specs_from_preset

    def specs(text: str) -> list[Any]:
        return specs_from_preset(parse_preset_text(text, tmp_path / "p.ini"), RouterSettings())

    remote = specs("[*]\nc = 4096\n[m@gpu]\nurl = http://10.0.0.2:8000/\napi-key = s3cret\n")[0]
    assert remote.served_name == "m" and remote.remote_url == "http://10.0.0.2:8000"
    assert "s3cret" not in remote.preset_ini and "s3cret" not in repr(remote) and remote.options == {}
    for bad, message in (("[m]\nurl = https://x:1\n", "only http://"), ("[m]\nurl = http://x:1/v1\n", "without a path"),
                         ("[m]\nurl = http://x:1\nmodel = a.gguf\n", "mean nothing"),
                         ("[*]\nurl = http://x:1\n", "belongs to one remote model"),
                         ("[m]\nmodel = a.gguf\npeers = http://x:1\n", "router-wide"),
                         ("[m]\nurl = http://x:1\ncheck-interval = 0\n", "more than 0")):
        with pytest.raises(ConfigError, match=message):
            specs(bad)
    assert parse_preset_text("peers = http://a:1\n[m]\nmodel = x\n", tmp_path / "p.ini") \
        .global_section.router_options == {"peers": "http://a:1"}


def test_two_routers_that_peer_each_other_neither_nest_names_nor_loop_requests(
        start_router, tiny_model: Path) -> None:
    port_b = _free_port()
    a = start_router(tiny_preset(tiny_model, ["tiny"]), "--peers", f"b=http://127.0.0.1:{port_b}")
    b = start_router(tiny_preset(tiny_model, ["tiny"]), "--port", str(port_b), "--peers", f"a={a.url}")
    _wait_entry(a, "tiny@b", "unloaded")
    _wait_entry(b, "tiny@a", "unloaded")
    time.sleep(1.0)  # a few feed rounds: nothing more may appear
    assert set(_entries(a)) == {"tiny", "tiny@b"} and set(_entries(b)) == {"tiny", "tiny@a"}
    # Through either, a request for `tiny` is served by one of the two children, never bounced
    # between the routers (a request from a peer is served by local models only).
    for router in (a, b):
        for _ in range(4):
            answer = router.client.post("/v1/chat/completions", json={"model": "tiny", **CHAT})
            assert answer.status_code == 200, answer.text
    forwarded = b.client.post("/v1/chat/completions", json={"model": "tiny@a", **CHAT},
                              headers={"X-Modelyard-Via": "another-router"})
    assert forwarded.status_code == 400  # from a peer: b's own models only


# -- in-process peers, for what a real resolver or a long silence cannot show quickly -------------

@contextlib.asynccontextmanager
async def _peers_in_process(*given: str, resolve_s: float = 10.0) -> AsyncIterator[Peers]:
    """A router's peer links, without the router: a real registry and real connections."""
    settings = RouterSettings(peers=given, peers_resolve_s=resolve_s)
    http = UpstreamClient(connect_timeout_s=0.5, read_timeout_s=5.0)
    peers = Peers(Registry(settings, [], EventHub(), http), settings)
    peers.start()
    try:
        yield peers
    finally:
        await peers.stop()
        await http.close()


def _scripted_resolver(monkeypatch: pytest.MonkeyPatch, answers: list[Any]) -> None:
    """The event loop's getaddrinfo answers each lookup with the next of `answers` (addresses, or
    an OSError to raise), then the last one again and again."""

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, OSError):
            raise answer
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in answer]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)


async def _until(predicate: Any, what: str, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.mark.anyio
async def test_a_peer_host_name_is_every_address_it_resolves_to_followed_as_it_changes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A headless Service's name: each address a peer, looked up again and again (here the
    resolver is scripted; the links themselves connect for real and find nobody there)."""
    _scripted_resolver(monkeypatch, [["10.9.0.1", "10.9.0.2"], ["10.9.0.2", "10.9.0.3"], OSError("no such host")])
    async with _peers_in_process("http://nodes.svc:8080", resolve_s=0.05) as peers:
        for expected in ({"10.9.0.1:8080", "10.9.0.2:8080"}, {"10.9.0.2:8080", "10.9.0.3:8080"}):
            await _until(lambda expected=expected: set(peers.links) == expected, f"the peers {expected}")
        await asyncio.sleep(0.2)  # the name stops resolving: the peers it had stay
        assert set(peers.links) == {"10.9.0.2:8080", "10.9.0.3:8080"}


def test_a_peer_given_by_host_name_is_found_by_resolving_it(start_router, tiny_model: Path) -> None:
    node = start_router(tiny_preset(tiny_model, ["tiny"]))
    front = start_router(None, "--peers", f"http://localhost:{_port(node)}")
    _wait_entry(front, f"tiny@127.0.0.1:{_port(node)}", "unloaded")
    assert front.client.post("/v1/chat/completions", json={"model": "tiny", **CHAT}).status_code == 200


# -- what the review of the scale-out work found, each a test ------------------------------------

def _in_flight(router: RouterProcess) -> dict[str, int]:
    return {name: e["in_flight"] for name, e in _entries(router).items()}


def test_a_remote_section_naming_its_own_router_does_not_send_requests_round(
        start_router, tiny_model: Path) -> None:
    port = _free_port()
    router = start_router(tiny_preset(tiny_model, ["tiny"], extra="concurrency-limit = 1\n") +
                          f"[tiny@self]\nurl = http://127.0.0.1:{port}\ncheck-interval = 0.2\n", "--port", str(port))
    _wait_entry(router, "tiny@self", "loaded")
    body = {"model": "tiny", **CHAT, "max_tokens": 20, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: router.client.post("/v1/chat/completions", json=body), range(3)))
    # The local one takes one request; one more goes to "the remote", which is this router again:
    # there it may only use its own model (busy: 429). Nothing goes round.
    assert all(a.status_code in (200, 429) for a in answers), [a.text for a in answers]
    assert any(a.status_code == 200 for a in answers)
    _wait(lambda: set(_in_flight(router).values()) == {0}, "every lease to be released")


def test_a_body_too_deep_to_parse_for_a_remote_releases_its_lease(start_router, tiny_model: Path) -> None:
    node = start_router(tiny_preset(tiny_model, ["tiny"]))
    front = start_router(f"version = 1\n[tiny@box]\nurl = {node.url}\ncheck-interval = 0.2\nconcurrency-limit = 1\n"
                         "use-model-name = tiny\n")
    _wait_entry(front, "tiny@box", "loaded")
    deep = b"[" * 100_000
    for path in ("/v1/chat/completions", "/upstream/tiny@box/v1/chat/completions"):
        answer = front.client.post(path, content=deep, headers={"content-type": "application/json"})
        assert 400 <= answer.status_code < 500, answer.text
    assert front.client.post("/v1/chat/completions", json={"model": "tiny@box", **CHAT}).status_code == 200
    assert _in_flight(front)["tiny@box"] == 0


def test_a_remote_model_is_reached_on_its_inference_routes_only(start_router, tiny_model: Path) -> None:
    node = start_router(tiny_preset(tiny_model, ["tiny"]), "--api-key", "remote-key")
    front = start_router(f"version = 1\n[tiny@box]\nurl = {node.url}\napi-key = remote-key\n"
                         "check-interval = 0.2\nuse-model-name = tiny\n")
    _wait_entry(front, "tiny@box", "loaded")
    # With its key, the front could unload the node's models or read its files for anyone: no.
    for method, path in (("POST", "/upstream/tiny@box/models/unload"), ("GET", "/v1/files?model=tiny@box"),
                         ("GET", "/slots?model=tiny@box")):
        answer = front.client.request(method, path, json={"model": "tiny"} if method == "POST" else None)
        assert answer.status_code == 400 and "inference routes" in answer.json()["error"]["message"], answer.text
    assert front.client.post("/v1/chat/completions", json={"model": "tiny", **CHAT}).status_code == 200


def test_a_peers_own_routes_and_query_names_reach_its_model(start_router, tiny_model: Path) -> None:
    node = start_router(tiny_preset(tiny_model, ["tiny"], extra="alias = chat\n"), "--api-key", "k")
    front = start_router(None, "--api-key", "k", "--peers", f"n={node.url}")
    headers = {"Authorization": "Bearer k"}
    _wait(lambda: "tiny@n" in {e["id"] for e in front.client.get("/models", headers=headers).json()["data"]},
          "the peer's model")
    # /upstream/<model>@peer/<path> is the model's own <path> (through the peer's /upstream),
    # never the peer router's own routes.
    props = front.client.get("/upstream/tiny@n/props", headers=headers)
    assert props.status_code == 200 and "default_generation_settings" in props.json()
    unload = front.client.post("/upstream/tiny@n/models/unload", json={"model": "tiny"}, headers=headers)
    assert unload.status_code in (404, 405), unload.text  # the child has no such route
    # ?model=name@peer names the model as the peer knows it; a peer's aliases work through the front.
    assert front.client.get("/props", params={"model": "tiny@n"}, headers=headers).status_code == 200
    chat = front.client.post("/v1/chat/completions", json={"model": "chat", **CHAT}, headers=headers)
    assert chat.status_code == 200, chat.text


@pytest.mark.parametrize("feed, reason", [
    (b"data: " + b"[" * 100_000 + b"\n\n", "not a status event"),
    (b"data: x\n" * 200_000, "over 1048576 bytes"),
    (b"data: {\"model\": \"ghost\", \"event\": \"status_change\", \"data\": {\"status\": \"exploded\"}}\n\n",
     "unknown status"),
])
def test_a_peer_feed_that_breaks_the_rules_turns_its_models_unloaded_and_is_retried(
        start_router, fake_peer: Any, feed: bytes, reason: str) -> None:
    url, asked = fake_peer(feed=feed)
    front = start_router(None, "--peers", f"p={url}")
    entry = _wait_entry(front, "ghost@p", "unloaded")
    assert reason in entry["status"]["error"]
    _wait(lambda: asked["/models/sse"] >= 3, "the feed to be retried")
    assert front.client.get("/health").status_code == 200


def test_a_peer_feed_that_ends_at_once_or_reloads_is_not_reopened_in_a_tight_loop(
        start_router, fake_peer: Any) -> None:
    ends, ends_asked = fake_peer(feed=b"")
    reloads, reloads_asked = fake_peer(feed=b'data: {"model": "*", "event": "models_reload", "data": {}}\n\n' * 50,
                                       hold_s=3.0)
    front = start_router(None, "--peers", f"e={ends},r={reloads}")
    time.sleep(3.0)
    assert ends_asked["/models/sse"] <= 6, ends_asked  # backoff 0.5, 1, 2 s...
    assert reloads_asked["/models"] <= 6, reloads_asked  # one list a second at most
    assert front.client.get("/health").status_code == 200


def test_a_peer_list_is_bounded_and_only_its_facts_are_kept(start_router, fake_peer: Any) -> None:
    evil = "ev\nil 2026-01-01 CRITICAL forged"
    listing = json.dumps({"data": [
        {"id": "good", "status": {"value": "loaded"}, "meta": {"n_ctx": 1}, "junk": "x" * 1000},
        {"id": evil, "status": {"value": "loaded"}}, {"id": "y" * 300, "status": {"value": "loaded"}},
    ]}).encode()
    url, _ = fake_peer(listing=listing, feed=b": ping\n\n", hold_s=5.0)
    huge, _ = fake_peer(listing=b'{"data": [' + b'{"id": "m"},' * 2_000_000 + b'{"id": "n"}]}', hold_s=5.0)
    front = start_router(None, "--peers", f"p={url},h={huge}")
    entry = _wait_entry(front, "good@p", "loaded")
    assert entry["meta"] == {"n_ctx": 1} and "junk" not in entry
    assert set(_entries(front)) == {"good@p"}  # no forged log line, no 300-character name, nothing of h
    _wait(lambda: "over 16777216 bytes" in front.log_text(), "the huge list to be refused")
    assert "CRITICAL forged" not in front.log_text()


def test_a_reload_points_a_remote_model_at_its_new_url_at_once(start_router, tiny_model: Path) -> None:
    old = start_router(tiny_preset(tiny_model, ["tiny"]))
    new = start_router(tiny_preset(tiny_model, ["tiny"]))
    section = "version = 1\n[tiny@box]\nurl = {}\ncheck-interval = 30\nuse-model-name = tiny\n"
    front = start_router(section.format(old.url))
    _wait_entry(front, "tiny@box", "loaded")
    front.preset_path.write_text(section.format(new.url))
    assert front.client.get("/models", params={"reload": "1"}).status_code == 200
    _wait_entry(front, "tiny@box", "loaded", timeout_s=5)  # checked at once, not in 30 s
    assert front.client.post("/v1/chat/completions", json={"model": "tiny", **CHAT}).status_code == 200
    assert new.model_entry("tiny")["last_used"] is not None and old.model_entry("tiny")["last_used"] is None


def test_peers_and_remote_keys_that_cannot_work_stop_the_router(start_router, tiny_model: Path) -> None:
    for args, message in ((["--peers", "a=http://127.0.0.1:9,a=http://127.0.0.1:10"], "given twice"),
                          (["--peers", "http://127.0.0.1:9", "--peers-api-key", "ключ"], "printable ASCII")):
        with pytest.raises(RuntimeError, match=message):
            start_router(None, *args)
    with pytest.raises(RuntimeError, match="printable ASCII"):
        start_router("version = 1\n[m@x]\nurl = http://127.0.0.1:9\napi-key = ключ\n")


@pytest.mark.anyio
async def test_a_static_peer_stays_when_a_host_name_stops_resolving_to_its_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted_resolver(monkeypatch, [["10.9.0.2"], ["10.9.0.5"]])
    async with _peers_in_process("http://10.9.0.2:8080", "http://nodes.svc:8080", resolve_s=0.05) as peers:
        await _until(lambda: set(peers.links) == {"10.9.0.2:8080", "10.9.0.5:8080"}, "the static peer to stay")


# -- what the second review found ------------------------------------------------------------------

@pytest.mark.anyio
async def test_a_peer_whose_feed_goes_silent_is_marked_down(monkeypatch: pytest.MonkeyPatch, fake_peer: Any) -> None:
    """A peer that hangs (SIGSTOP, a host that drops packets) sends nothing more: after the feed's
    silence limit its models are unloaded, though the feed had been followed for a while."""
    monkeypatch.setattr(peer_links, "FEED_SILENCE_S", 6.0)  # over STABLE_FEED_S, as 60 s is
    url, _ = fake_peer(feed=b": ping\n\n", hold_s=60.0)
    async with _peers_in_process(f"p={url}") as peers:
        records = peers.registry.records
        await _until(lambda: "ghost@p" in records and records["ghost@p"].status == "loaded", "the peer's model")
        await _until(lambda: records["ghost@p"].unreachable is not None, "a silent peer to be marked down", 10.0)
        assert records["ghost@p"].status == "unloaded" and not records["ghost@p"].routable

def test_a_front_reaches_a_nodes_remote_model_and_nothing_goes_round(start_router, tiny_model: Path) -> None:
    server = start_router(tiny_preset(tiny_model, ["tiny"]))
    node = start_router(f"version = 1\n[tiny@r]\nurl = {server.url}\ncheck-interval = 0.2\nuse-model-name = tiny\n")
    front = start_router(None, "--peers", f"n={node.url}")
    _wait_entry(front, "tiny@r@n", "loaded")
    for name in ("tiny@r", "tiny@r@n"):
        answer = front.client.post("/v1/chat/completions", json={"model": name, **CHAT})
        assert answer.status_code == 200, answer.text
    assert server.model_entry("tiny")["last_used"] is not None


def test_a_remote_stream_route_with_dot_segments_is_refused() -> None:
    from router.upstream import remote_may_serve

    assert remote_may_serve("/v1/chat/completions") and remote_may_serve("/v1/stream/conv-1")
    for path in ("/v1/stream/../../models/unload", "/v1/stream/%2e%2e/%2e%2e/admin", "/v1/stream/a/b",
                 "/v1/stream/./x", "/models/unload", "/v1/files"):
        assert not remote_may_serve(path), path


def test_a_peers_list_change_is_taken_within_a_second_or_so(start_router, fake_peer: Any) -> None:
    reload_event = b'data: {"model": "*", "event": "models_reload", "data": {}}\n\n'
    url, _ = fake_peer(feed=b": ping\n\n", later=(0.5, reload_event), hold_s=30.0)
    front = start_router(None, "--peers", f"p={url}")
    _wait_entry(front, "ghost@p", "loaded")
    fake_peer.handler_of(url).listing = json.dumps({"data": [{"id": "ghost", "status": {"value": "loaded"}},
                                                             {"id": "new", "status": {"value": "loaded"}}]}).encode()
    _wait_entry(front, "new@p", "loaded", timeout_s=5)  # not at the next ping, 15 s on


def test_a_peers_answer_to_a_load_is_bounded(start_router, fake_peer: Any) -> None:
    url, asked = fake_peer(feed=b": ping\n\n", hold_s=30.0, control_answer=b"x" * (8 * 1024 * 1024))
    front = start_router(None, "--peers", f"p={url}")
    _wait_entry(front, "ghost@p", "loaded")
    answer = front.client.post("/models/load", json={"model": "ghost@p"})
    assert answer.status_code == 502 and "over 65536 bytes" in answer.json()["error"]["message"]
    assert asked["/models/load"] == 1


def test_a_multipart_request_naming_a_model_its_server_knows_otherwise_is_refused(
        start_router, tiny_model: Path) -> None:
    node = start_router(tiny_preset(tiny_model, ["tiny"]))
    front = start_router(f"version = 1\n[tiny@box]\nurl = {node.url}\ncheck-interval = 0.2\nuse-model-name = tiny\n")
    _wait_entry(front, "tiny@box", "loaded")
    answer = front.client.post("/v1/audio/transcriptions", data={"model": "tiny@box"},
                               files={"file": ("a.wav", b"RIFF", "audio/wav")})
    assert answer.status_code == 400 and "multipart" in answer.json()["error"]["message"]


def test_a_reload_cannot_take_a_peers_model_name(start_router, fake_peer: Any, tiny_model: Path) -> None:
    url, _ = fake_peer(feed=b": ping\n\n", hold_s=30.0)
    front = start_router(tiny_preset(tiny_model, ["tiny"]), "--peers", f"p={url}")
    _wait_entry(front, "ghost@p", "loaded")
    front.preset_path.write_text(tiny_preset(tiny_model, ["tiny"]) + "[ghost@p]\nurl = http://127.0.0.1:9\n")
    answer = front.client.get("/models", params={"reload": "1"})
    assert answer.status_code == 400 and "peer's model" in answer.json()["error"]["message"]
    assert _entries(front)["ghost@p"]["source"] == "peer"


def test_running_lists_this_routers_own_processes_only(start_router, tiny_model: Path) -> None:
    node = start_router(tiny_preset(tiny_model, ["tiny"], extra="load-on-startup = true\n"))
    front = start_router(tiny_preset(tiny_model, ["local"], extra="load-on-startup = true\n"),
                         "--peers", f"n={node.url}")
    _wait_entry(front, "tiny@n", "loaded")
    _wait_entry(front, "local", "loaded")
    assert [r["model"] for r in front.client.get("/running").json()["running"]] == ["local"]


def test_a_reload_that_changes_aliases_changes_what_the_replica_index_routes(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"], extra="alias = old-name\n"))
    assert router.client.post("/v1/chat/completions", json={"model": "old-name", **CHAT}).status_code == 200
    router.preset_path.write_text(tiny_preset(tiny_model, ["tiny"], extra="alias = new-name\n"))
    assert router.client.get("/models", params={"reload": "1"}).status_code == 200
    assert router.client.post("/v1/chat/completions", json={"model": "new-name", **CHAT}).status_code == 200
    assert router.client.post("/v1/chat/completions", json={"model": "old-name", **CHAT}).status_code == 400
