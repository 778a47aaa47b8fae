"""Hugging Face downloads through huggingface_hub, against a local stand-in hub on 127.0.0.1."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download

from conftest import EventFeed
from fake_hub import FakeHub

REPO = "alice/tiny-GGUF"
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}


@pytest.fixture
def hub(tiny_model: Path, tmp_path: Path) -> Iterator[FakeHub]:
    hub = FakeHub()
    big = tmp_path / "big.gguf"
    big.write_bytes(tiny_model.read_bytes() * 8)  # about 4 MB, for a download slow enough to cancel
    hub.add_repo(REPO, {"tiny-Q4_K_M.gguf": tiny_model, "tiny-Q8_0.gguf": tiny_model, "README.md": tiny_model})
    hub.add_repo("alice/big-GGUF", {"big-Q4_K_M.gguf": big})
    yield hub
    hub.close()


def _router(start_router, hub: FakeHub, tmp_path: Path, *args: str):
    return start_router(None, *args, env={"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf")})


def test_downloads_fetch_report_progress_and_serve(start_router, hub: FakeHub, tmp_path: Path) -> None:
    hub.bytes_per_second = 1_000_000  # about half a second for the tiny file
    router = _router(start_router, hub, tmp_path)
    feed = EventFeed(router.url)
    try:
        answer = router.client.post("/models", json={"model": f"{REPO}:q8_0"})
        assert answer.json() == {"success": True, "model": f"{REPO}:Q8_0"}
        name = f"{REPO}:Q8_0"
        feed.wait_for(lambda e: e["model"] == name and e["event"] == "download_finished")
        statuses = [e["data"].get("status") for e in feed.seen if e["model"] == name and e["event"] == "status_change"]
        assert statuses[0] == "downloading" and statuses[-1] == "unloaded"
        progress = [e["data"]["progress"]["tiny-Q8_0.gguf"] for e in feed.seen if e["event"] == "download_progress"]
        assert progress[-1]["done"] == progress[-1]["total"] > 0
        assert 2 <= len(progress) <= 2 + 10 * 2  # at most every 100 ms over about a second or two
    finally:
        feed.close()
    entry = router.model_entry(name)
    assert entry["source"] == "cache" and entry["aliases"] == [f"{REPO}:q8_0"]
    assert router.client.post("/v1/chat/completions", json={"model": name, **CHAT}).status_code == 200
    assert "GET /alice/tiny-GGUF/resolve/main/tiny-Q8_0.gguf" in hub.requests
    again = router.client.post("/models", json={"model": f"{REPO}:Q8_0"})
    assert again.status_code == 400 and "already exists" in again.json()["error"]["message"]


@pytest.mark.parametrize(("reference", "fragment"), [
    ("bob/missing-GGUF", "model validation failed"),
    ("../../etc/passwd", "expected 'user/repo'"),
    ("/abs/path.gguf", "expected 'user/repo'"),
    (f"{REPO}:Q2_K", "no GGUF file for quant Q2_K (it has: tiny-Q4_K_M.gguf, tiny-Q8_0.gguf)"),
])
def test_downloads_bad_references_are_refused(start_router, hub: FakeHub, tmp_path: Path, reference: str,
                                              fragment: str) -> None:
    router = _router(start_router, hub, tmp_path)
    answer = router.client.post("/models", json={"model": reference})
    assert answer.status_code == 400 and fragment in answer.json()["error"]["message"]
    assert router.client.get("/models").json()["data"] == []


def test_downloads_unload_cancels_and_leaves_no_partial_file(start_router, hub: FakeHub, tmp_path: Path) -> None:
    hub.bytes_per_second = 400_000  # 10 s for the big file: plenty of time to cancel
    router = _router(start_router, hub, tmp_path)
    feed = EventFeed(router.url)
    try:
        name = router.client.post("/models", json={"model": "alice/big-GGUF"}).json()["model"]
        assert name == "alice/big-GGUF:Q4_K_M"
        feed.wait_for(lambda e: e["event"] == "download_progress" and e["model"] == name)
        assert router.status(name) == "downloading"
        assert router.client.post("/models/unload", json={"model": name}).json() == {"success": True}
        feed.wait_for(lambda e: e["event"] == "download_failed" and e["model"] == name)
    finally:
        feed.close()
    cache = tmp_path / "hf"
    assert not list(cache.rglob("*.incomplete"))
    assert not (cache / "models--alice--big-GGUF").exists()
    assert router.client.get("/models").json()["data"] == []


def test_downloads_cached_models_are_listed_and_removable(start_router, hub: FakeHub, tmp_path: Path,
                                                          tiny_model: Path) -> None:
    cache = tmp_path / "hf"
    hf_hub_download(REPO, "tiny-Q4_K_M.gguf", cache_dir=cache, endpoint=hub.url)
    preset = tmp_path / "p.ini"
    preset.write_text(f"[local]\nmodel = {tiny_model}\n")
    router = _router(start_router, hub, tmp_path, "--models-preset", str(preset))
    name = f"{REPO}:Q4_K_M"
    entry = router.model_entry(name)
    assert entry["source"] == "cache"
    assert router.client.post("/v1/chat/completions", json={"model": name, **CHAT}).status_code == 200
    assert router.client.delete("/models", params={"model": "local"}).status_code == 400
    assert router.client.delete("/models", params={"model": "nobody"}).status_code == 404
    feed = EventFeed(router.url)
    try:
        assert router.client.delete("/models", params={"model": name}).json() == {"success": True}
        feed.wait_for(lambda e: e["event"] == "model_remove" and e["model"] == name)
    finally:
        feed.close()
    assert not (cache / "models--alice--tiny-GGUF").exists()
    assert [m["id"] for m in router.client.get("/models").json()["data"]] == ["local"]
    # A model that lands in the cache later shows up on reload.
    hf_hub_download(REPO, "tiny-Q8_0.gguf", cache_dir=cache, endpoint=hub.url)
    ids = [m["id"] for m in router.client.get("/models", params={"reload": "1"}).json()["data"]]
    assert sorted(ids) == [f"{REPO}:Q8_0", "local"]
    shutil.rmtree(cache, ignore_errors=True)
