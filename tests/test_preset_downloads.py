"""A preset model with `hf-repo` (llama-server's -hf): downloaded on its first load, against a local
stand-in hub on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import logging
from pathlib import Path

import httpx
import pytest

from conftest import HUB_REPO as REPO
from conftest import EventFeed
from fake_hub import FakeHub
from router.errors import ConfigError
from router.model_sources import collect_specs
from router.presets import parse_preset_text
from router.settings import RouterSettings

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}
HEADER = "version = 1\n[*]\nc = 2048\nnp = 2\nt = 1\n"
TINY_Q8 = f"GET /{REPO}/resolve/main/tiny-Q8_0.gguf"


def _router(start_router, hub: FakeHub, tmp_path: Path, sections: str):
    return start_router(HEADER + sections, env={"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf")})


def _chat(router, model: str, timeout_s: float = 60.0) -> httpx.Response:
    return httpx.post(router.url + "/v1/chat/completions", json={"model": model, **CHAT}, timeout=timeout_s)


def _statuses(feed: EventFeed, name: str) -> list[str]:
    """The model's statuses on the feed, each once in a row (progress repeats `loading`)."""
    seen: list[str] = []
    for event in feed.seen:
        is_status = event["model"] == name and event["event"] in ("status_change", "model_status")
        if is_status and (not seen or seen[-1] != event["data"]["status"]):
            seen.append(event["data"]["status"])
    return seen


def test_preset_downloads_every_spelling_of_the_keys(tmp_path: Path) -> None:
    for key, file_key in [("hf-repo", "hf-file"), ("hf", "hff"), ("hfr", "hff"), ("--hf-repo", "--hf-file"),
                          ("hf_repo", "hf_file"), ("LLAMA_ARG_HF_REPO", "LLAMA_ARG_HF_FILE")]:
        preset = parse_preset_text(f"[m]\n{key} = {REPO}:Q8_0\n{file_key} = tiny-Q8_0.gguf\n", tmp_path / "p.ini")
        section = preset.sections[0]
        assert section.router_options == {"hf-repo": f"{REPO}:Q8_0", "hf-file": "tiny-Q8_0.gguf"}, key
        assert section.options == {}
    path = tmp_path / "p.ini"
    path.write_text(f"{HEADER}[qwen]\nhf = {REPO}\n")
    spec = collect_specs(RouterSettings(models_preset=str(path)))[0]
    assert (spec.hf_repo, spec.hf_file, spec.source) == (REPO, "", "preset")
    assert not any(arg.startswith("--hf") for arg in spec.child_args())  # never the child's
    assert f"hf-repo = {REPO}" in spec.preset_ini


@pytest.mark.parametrize(("text", "message"), [
    (f"[*]\nhf-repo = {REPO}\n[m]\nmodel = x.gguf\n", "'hf-repo' names one model's file"),
    ("[m]\nhff = tiny-Q8_0.gguf\n", "has hf-file but no hf-repo"),
    ("[m]\nhf-repo = ../../etc\n", "hf-repo: expected 'user/repo'"),
    (f"[m]\nhf-repo = {REPO}\nhf-file = ../x.gguf\n", "hf-file must be a file's path inside the repository"),
    ("[m]\nc = 1024\n", "has no 'model' key (path to a GGUF file) nor 'hf-repo'"),
])
def test_preset_downloads_bad_sections_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.ini"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        collect_specs(RouterSettings(models_preset=str(path)))


def test_preset_downloads_model_wins_over_hf_repo_with_one_warning(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "p.ini"
    path.write_text(f"[m]\nmodel = local.gguf\nhf-repo = {REPO}\n")
    with caplog.at_level(logging.WARNING, logger="router.model_sources"):
        for _ in range(3):  # a reload reads the preset again
            spec = collect_specs(RouterSettings(models_preset=str(path)))[0]
    assert spec.hf_repo == "" and spec.options["model"] == str(tmp_path / "local.gguf")
    assert [r.getMessage() for r in caplog.records].count(
        f"{path}:1: model [m] has both 'model' and 'hf-repo': 'model' wins, nothing is downloaded") == 1


def test_preset_downloads_first_load_downloads_then_a_restart_finds_it_cached(start_router, hub: FakeHub,
                                                                              tmp_path: Path) -> None:
    hub.bytes_per_second = 1_000_000  # about half a second for the tiny file: progress to watch
    sections = f"[qwen]\nhf-repo = {REPO}:Q8_0\n"
    router = _router(start_router, hub, tmp_path, sections)
    entry = router.model_entry("qwen")
    assert entry["source"] == "preset" and entry["status"]["value"] == "unloaded"
    feed = EventFeed(router.url)
    try:
        assert _chat(router, "qwen").status_code == 200
        feed.wait_for(lambda e: e["model"] == "qwen" and e["data"].get("status") == "loaded")
    finally:
        feed.close()
    assert _statuses(feed, "qwen") == ["unloaded", "downloading", "unloaded", "loading", "loaded"]
    kinds = [e["event"] for e in feed.seen if e["model"] == "qwen" and e["event"].startswith("download_")]
    assert kinds[-1] == "download_finished" and kinds.count("download_progress") >= 2
    progress = [e["data"]["progress"]["tiny-Q8_0.gguf"] for e in feed.seen if e["event"] == "download_progress"]
    assert progress[-1]["done"] == progress[-1]["total"] > 0
    entry = router.model_entry("qwen")
    assert entry["source"] == "preset" and entry["status"]["value"] == "loaded"
    args = entry["status"]["args"]
    assert not any(arg.startswith("--hf") for arg in args)
    assert args[args.index("--model") + 1].startswith(str(tmp_path / "hf" / "models--alice--tiny-GGUF"))
    assert hub.requests.count(TINY_Q8) == 1
    router.stop()

    asked = len(hub.requests)
    again = _router(start_router, hub, tmp_path, sections)
    feed = EventFeed(again.url)
    try:
        assert _chat(again, "qwen").status_code == 200
    finally:
        feed.close()
    assert hub.requests[asked:] == []  # found in the cache: the hub was not asked anything
    assert not [e for e in feed.seen if e["event"].startswith("download_")]
    assert again.model_entry("qwen")["source"] == "preset"


def test_preset_downloads_failures_answer_the_request_and_leave_the_model(start_router, hub: FakeHub,
                                                                          tmp_path: Path) -> None:
    router = _router(start_router, hub, tmp_path, f"[odd]\nhf-repo = {REPO}:Q2_K\n[qwen]\nhf-repo = {REPO}:Q8_0\n"
                                                  "[nobody]\nhf-repo = bob/missing-GGUF\n")
    feed = EventFeed(router.url)
    try:
        answer = _chat(router, "odd")
        assert answer.status_code == 400
        assert "has no GGUF file for quant Q2_K (it has: tiny-Q4_K_M.gguf, tiny-Q8_0.gguf)" in \
            answer.json()["error"]["message"]
        failed = feed.wait_for(lambda e: e["model"] == "odd" and e["event"] == "download_failed")
        assert "Q2_K" in failed["data"]["error"]
        answer = _chat(router, "nobody")
        assert answer.status_code == 400 and "unable to download bob/missing-GGUF" in answer.json()["error"]["message"]
        hub.fail_status = 503  # a broken hub is the hub's fault: 502
        answer = _chat(router, "qwen")
        assert answer.status_code == 502 and "unable to download" in answer.json()["error"]["message"]
    finally:
        feed.close()
    assert _statuses(feed, "odd") == ["unloaded", "downloading", "unloaded"]
    for name in ("odd", "qwen", "nobody"):
        entry = router.model_entry(name)
        assert entry["source"] == "preset" and entry["status"]["value"] == "unloaded"
    hub.fail_status = None  # the next request tries again
    assert _chat(router, "qwen").status_code == 200


@pytest.mark.parametrize("how", ["unload", "delete"])
def test_preset_downloads_unload_cancels_and_leaves_no_partial_file(start_router, hub: FakeHub, tmp_path: Path,
                                                                    how: str) -> None:
    hub.bytes_per_second = 400_000  # 10 s for the big file: plenty of time to cancel
    router = _router(start_router, hub, tmp_path, "[big]\nhf-repo = alice/big-GGUF\n")
    feed = EventFeed(router.url)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            assert router.client.post("/models/load", json={"model": "big"}).json() == {"success": True}
            waiting = pool.submit(_chat, router, "big")
            feed.wait_for(lambda e: e["event"] == "download_progress" and e["model"] == "big")
            assert router.status("big") == "downloading"
            if how == "unload":
                stopped = router.client.post("/models/unload", json={"model": "big"})
            else:
                stopped = router.client.delete("/models", params={"model": "big"})
            assert stopped.json() == {"success": True}
            feed.wait_for(lambda e: e["event"] == "download_failed" and e["model"] == "big")
            answer = waiting.result(30)
        finally:
            feed.close()
    assert answer.status_code == 500 and "unloaded while it downloaded" in answer.json()["error"]["message"]
    assert router.status("big") == "unloaded" and router.model_entry("big")["source"] == "preset"
    cache = tmp_path / "hf"
    assert not list(cache.rglob("*.incomplete"))
    assert not list((cache / "models--alice--big-GGUF" / "blobs").glob("*"))


def test_preset_downloads_concurrent_requests_share_one_download(start_router, hub: FakeHub,
                                                                 tmp_path: Path) -> None:
    hub.bytes_per_second = 300_000  # a second or two: the second request comes during the download
    router = _router(start_router, hub, tmp_path, f"[exact]\nhf-repo = {REPO}\nhf-file = tiny-Q8_0.gguf\n")
    feed = EventFeed(router.url)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(_chat, router, "exact")
            feed.wait_for(lambda e: e["event"] == "download_progress" and e["model"] == "exact")
            second = pool.submit(_chat, router, "exact")
            assert first.result(60).status_code == 200 and second.result(60).status_code == 200
        finally:
            feed.close()
    assert hub.requests.count(TINY_Q8) == 1
    assert "GET /alice/tiny-GGUF/resolve/main/tiny-Q4_K_M.gguf" not in hub.requests  # hf-file named the file


def test_preset_downloads_a_client_that_leaves_costs_nothing(start_router, hub: FakeHub, tmp_path: Path) -> None:
    hub.bytes_per_second = 1_000_000
    router = _router(start_router, hub, tmp_path, f"[qwen]\nhf-repo = {REPO}:Q8_0\n")
    with pytest.raises(httpx.ReadTimeout):
        _chat(router, "qwen", timeout_s=0.2)  # gone during the download
    router.wait_status("qwen", "loaded")  # the download went on, and the load after it
    assert hub.requests.count(TINY_Q8) == 1
    assert _chat(router, "qwen").status_code == 200


def test_preset_downloads_a_repo_without_the_default_quant_loads_its_first_gguf(start_router, hub: FakeHub,
                                                                               tmp_path: Path,
                                                                               tiny_model: Path) -> None:
    hub.add_repo("alice/odd-GGUF", {"odd-Q8_0.gguf": tiny_model})
    router = _router(start_router, hub, tmp_path, "[odd]\nhf-repo = alice/odd-GGUF\n")
    assert _chat(router, "odd").status_code == 200
    assert router.client.post("/models/unload", json={"model": "odd"}).json() == {"success": True}
    router.wait_status("odd", "unloaded")
    asked = len(hub.requests)
    assert _chat(router, "odd").status_code == 200  # what it downloaded is found again: no second fetch
    assert hub.requests[asked:] == [] and hub.requests.count("GET /alice/odd-GGUF/resolve/main/odd-Q8_0.gguf") == 1
