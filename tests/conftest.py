"""Shared fixtures: real models, a real router process on port 0, and its status feed."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_hub import FakeHub  # noqa: E402
from router.bundled_models import SMOLLM2, resolve_package_model  # noqa: E402
from tiny_model import write_tiny_model  # noqa: E402

FAKE_CHILD = Path(__file__).parent / "fake_child.py"
LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")
START_TIMEOUT_S = 30.0


@pytest.fixture
def anyio_backend() -> str:
    """In-process async tests run on asyncio (anyio's pytest plugin)."""
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    return Path(resolve_package_model(SMOLLM2))


def _is_reaper(proc: psutil.Process) -> bool:
    try:
        return any(part.endswith("orphan_reaper.py") for part in proc.cmdline())
    except psutil.Error:
        return False


def terminate(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, and SIGKILL if it has not exited within 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class RouterProcess:
    """`python -m router` as a real subprocess; its stderr is collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, hf_cache: Path | None = None,
                 cwd: Path | None = None) -> None:
        full_env = {**os.environ, **(env or {})}
        full_env.pop("LLAMA_SERVER_ROUTER_PORT", None)
        if hf_cache is not None and "HF_HUB_CACHE" not in (env or {}):
            full_env["HF_HUB_CACHE"] = str(hf_cache)  # never the user's own Hugging Face cache
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", "0", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env,
            text=True, errors="replace", cwd=cwd,
        )
        self.lines: list[str] = []
        self._listening: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = self._wait_listening()
        self.client = httpx.Client(base_url=self.url, timeout=60.0)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            match = LISTENING.search(line)
            if match:
                self._listening.put(f"http://{match.group(1)}:{match.group(2)}")
        self._listening.put("")

    def _wait_listening(self) -> str:
        try:
            url = self._listening.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            url = ""
        if not url:
            self.proc.kill()
            raise RuntimeError("router did not start:\n" + "\n".join(self.lines[-40:]))
        return url

    def log_text(self) -> str:
        return "\n".join(self.lines)

    @property
    def preset_path(self) -> Path:
        return Path(self.proc.args[self.proc.args.index("--models-preset") + 1])

    def descendants(self) -> list[psutil.Process]:
        """Every process the router started, its orphan reaper included."""
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def children(self) -> list[psutil.Process]:
        """The model processes (and what they started): the descendants but the orphan reaper."""
        return [p for p in self.descendants() if not _is_reaper(p)]

    def child_of(self, model: str) -> psutil.Process:
        for child in self.children():
            with_alias = child.cmdline()
            if "--alias" in with_alias and with_alias[with_alias.index("--alias") + 1] == model:
                return child
        raise AssertionError(f"no child process for {model}")

    def model_entry(self, name: str) -> dict[str, Any]:
        for entry in self.client.get("/models").json()["data"]:
            if entry["id"] == name:
                return entry
        raise AssertionError(f"{name} not in /models")

    def status(self, name: str) -> str:
        return str(self.model_entry(name)["status"]["value"])

    def wait_status(self, name: str, value: str, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = self.model_entry(name)
            if entry["status"]["value"] == value:
                return entry
            time.sleep(0.05)
        raise AssertionError(f"{name} did not reach {value}: {self.model_entry(name)['status']}")

    def stop(self) -> None:
        self.client.close()
        terminate(self.proc)
        self._reader.join(5)


class EventFeed:
    """A live subscriber of /models/sse: events land in a queue as they arrive."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._client = httpx.Client(timeout=httpx.Timeout(5.0, read=None), headers=headers)
        self._stream = self._client.stream("GET", url + "/models/sse")
        self._response = self._stream.__enter__()
        assert self._response.status_code == 200
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._response.iter_lines():
                if line.startswith("data: "):
                    self.events.put(json.loads(line[6:]))
        except (httpx.HTTPError, RuntimeError):
            pass

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"event not seen in {timeout_s} s; saw {self.seen}")
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(event)
            if predicate(event):
                return event

    def close(self) -> None:
        self._client.close()


HUB_REPO = "alice/tiny-GGUF"  # the fake hub's repository of tiny quants


@pytest.fixture
def hub(tiny_model: Path, tmp_path: Path) -> Iterator[FakeHub]:
    """A stand-in for the Hugging Face Hub on 127.0.0.1 with two repositories: HUB_REPO (two quants
    of the tiny model and a README) and alice/big-GGUF (a file big enough to cancel mid-way)."""
    hub = FakeHub()
    big = tmp_path / "big.gguf"
    big.write_bytes(tiny_model.read_bytes() * 8)  # about 4 MB, for a download slow enough to cancel
    hub.add_repo(HUB_REPO, {"tiny-Q4_K_M.gguf": tiny_model, "tiny-Q8_0.gguf": tiny_model, "README.md": tiny_model})
    hub.add_repo("alice/big-GGUF", {"big-Q4_K_M.gguf": big})
    yield hub
    hub.close()


@contextlib.contextmanager
def smollm2_router(folder: Path, smollm2_model: Path, settings: str) -> Iterator[RouterProcess]:
    """A router serving SmolLM2 as `smollm2`, loaded at startup, with these preset lines (a
    module's shared router: `with smollm2_router(...) as router: yield router`)."""
    preset = write_preset(folder / "preset.ini",
                          f"version = 1\n[smollm2]\nmodel = {smollm2_model}\nload-on-startup = true\n{settings}\n")
    process = RouterProcess(["--models-preset", str(preset)], hf_cache=folder / "hf-cache")
    try:
        process.wait_status("smollm2", "loaded", timeout_s=120)
        yield process
    finally:
        process.stop()


def write_preset(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def fake_bin(*flags: str) -> str:
    """A preset `bin = ` value running the fake child with these flags."""
    return " ".join([sys.executable, str(FAKE_CHILD), *flags])


@pytest.fixture
def start_router(tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    started: list[RouterProcess] = []

    def start(preset_text: str | None = None, *args: str, env: dict[str, str] | None = None) -> RouterProcess:
        extra = list(args)
        if preset_text is None and "--models-preset" not in extra and "--models-dir" not in extra:
            extra.append("--no-default-preset")  # the HF cache only, not the packaged preset's models
        if preset_text is not None:
            preset = write_preset(tmp_path / f"preset{len(started)}.ini", preset_text)
            extra = ["--models-preset", str(preset), *extra]
        router = RouterProcess(extra, env=env, hf_cache=tmp_path / "hf-cache")
        started.append(router)
        return router

    yield start
    for router in started:
        children = router.descendants()
        router.stop()
        gone, alive = psutil.wait_procs(children, timeout=10)
        for proc in alive:
            proc.kill()
        assert not alive, f"children outlived the router: {alive}"


def tiny_preset(model: Path, names: list[str], extra: str = "", np: int = 2) -> str:
    sections = "".join(f"[{name}]\nmodel = {model}\n{extra}\n" for name in names)
    return f"version = 1\n[*]\nc = 2048\nnp = {np}\nt = 1\n\n{sections}"


class PlainChild:
    """`python -m child` started by hand (no router): a plain OpenAI-compatible server."""

    def __init__(self, model: Path, *flags: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "LLAMA_SERVER_ROUTER_PORT"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "child", "-m", str(model), "--port", "0", *flags],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        )
        assert self.proc.stderr is not None
        self.log: list[str] = []
        url = ""
        for line in self.proc.stderr:  # bounded by the test timeout
            self.log.append(line)
            if "serving" in line and "http://" in line:
                url = line.strip().rsplit(" ", 1)[-1]
                break
        assert url, "child did not start:\n" + "".join(self.log)
        self.url = url
        # Keep draining stderr so the child never blocks on a full pipe.
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr or []), daemon=True).start()
        self.client = httpx.Client(base_url=url, timeout=120)

    def metric(self, name: str) -> float:
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"metric {name} not found")

    def wait_metric(self, name: str, value: float, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} stayed at {self.metric(name)}, wanted {value}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def start_child() -> Iterator[Callable[..., PlainChild]]:
    started: list[PlainChild] = []

    def start(model: Path, *flags: str) -> PlainChild:
        child = PlainChild(model, *flags)
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()


def wait_dead(procs: list[psutil.Process], timeout_s: float) -> tuple[list[psutil.Process], float]:
    """Wait until every process has exited; returns (still alive, seconds waited).

    A zombie has exited: once the router is SIGKILLed its children are reparented to whatever
    reaps orphans here, which may take its time, but they run no code any more.
    """
    began = time.monotonic()
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                continue
        waited = time.monotonic() - began
        if not alive or waited >= timeout_s:
            return alive, waited
        time.sleep(0.005)


@contextlib.contextmanager
def waiting_for_room(router: RouterProcess, busy: str,
                     waiting: str) -> Iterator[concurrent.futures.Future[httpx.Response]]:
    """`busy` streams in the only place (--models-max 1) while a chat request for `waiting` waits
    for room; yields that request's future, and leaves once busy's stream has ended."""
    body = {"model": busy, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    chat = {"model": waiting, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0,
            "ignore_eos": True}
    with router.client.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(httpx.post, router.url + "/v1/chat/completions", json=chat, timeout=60)
            deadline = time.monotonic() + 30
            while f"load of {waiting} waits for room" not in router.log_text():
                assert time.monotonic() < deadline, f"{waiting} never waited for room"
                time.sleep(0.02)
            yield future
            assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
