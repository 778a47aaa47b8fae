"""Hugging Face downloads through huggingface_hub, against a local stand-in hub on 127.0.0.1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download

from conftest import HUB_REPO as REPO
from conftest import EventFeed
from fake_hub import FakeHub

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}


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


def _cached_files(cache: Path, repo: str) -> set[str]:
    snapshots = cache / ("models--" + repo.replace("/", "--")) / "snapshots"
    return {p.relative_to(snap).as_posix() for snap in snapshots.glob("*") for p in snap.rglob("*.gguf")}


def test_downloads_cancel_leaves_the_other_quants_of_the_repo(start_router, hub: FakeHub, tmp_path: Path,
                                                              tiny_model: Path) -> None:
    # Quants in sub-folders, as many repositories keep them: there is no GGUF at the top level.
    big = tmp_path / "big.gguf"
    big.write_bytes(tiny_model.read_bytes() * 8)
    hub.add_repo("alice/multi-GGUF", {"Q4_K_M/multi-Q4_K_M.gguf": tiny_model, "Q8_0/multi-Q8_0.gguf": big})
    router = _router(start_router, hub, tmp_path)
    feed = EventFeed(router.url)
    try:
        first = router.client.post("/models", json={"model": "alice/multi-GGUF:Q4_K_M"}).json()["model"]
        feed.wait_for(lambda e: e["model"] == first and e["event"] == "download_finished")
        hub.bytes_per_second = 400_000
        second = router.client.post("/models", json={"model": "alice/multi-GGUF:Q8_0"}).json()["model"]
        feed.wait_for(lambda e: e["model"] == second and e["event"] == "download_progress")
        assert router.client.post("/models/unload", json={"model": second}).json() == {"success": True}
        feed.wait_for(lambda e: e["model"] == second and e["event"] == "download_failed")
    finally:
        feed.close()
    cache = tmp_path / "hf"
    assert _cached_files(cache, "alice/multi-GGUF") == {"Q4_K_M/multi-Q4_K_M.gguf"}
    assert not list(cache.rglob("*.incomplete"))
    ids = [m["id"] for m in router.client.get("/models", params={"reload": "1"}).json()["data"]]
    assert ids == [first]
    assert router.client.post("/v1/chat/completions", json={"model": first, **CHAT}).status_code == 200


def test_downloads_one_cancelled_does_not_disturb_a_concurrent_one(start_router, hub: FakeHub, tmp_path: Path,
                                                                   tiny_model: Path) -> None:
    from tiny_model import write_tiny_model

    other = write_tiny_model(tmp_path / "other.gguf", seed=99)  # its own bytes: its own blob
    big = tmp_path / "big.gguf"
    big.write_bytes(tiny_model.read_bytes() * 8)
    hub.add_repo("alice/pair-GGUF", {"pair-Q8_0.gguf": big, "pair-Q4_K_M.gguf": other})
    # The big one is cancelled after a second or two (progress, and so the cancel, comes per MiB);
    # the small one takes about 20 s, so it is still downloading meanwhile.
    hub.bytes_per_second = 1_000_000
    hub.file_bytes_per_second["pair-Q4_K_M.gguf"] = 25_000
    router = _router(start_router, hub, tmp_path)
    feed = EventFeed(router.url)
    try:
        doomed = router.client.post("/models", json={"model": "alice/pair-GGUF:Q8_0"}).json()["model"]
        kept = router.client.post("/models", json={"model": "alice/pair-GGUF:Q4_K_M"}).json()["model"]
        feed.wait_for(lambda e: e["model"] == kept and e["event"] == "download_progress")
        feed.wait_for(lambda e: e["model"] == doomed and e["event"] == "download_progress")
        assert router.client.post("/models/unload", json={"model": doomed}).json() == {"success": True}
        feed.wait_for(lambda e: e["model"] == doomed and e["event"] == "download_failed")
        # The kept one was still downloading when the other was cancelled, and it finishes.
        assert not [e for e in feed.seen if e["model"] == kept and e["event"].startswith("download_f")]
        ended = feed.wait_for(lambda e: e["model"] == kept and e["event"] in ("download_finished", "download_failed"))
        assert ended["event"] == "download_finished"
    finally:
        feed.close()
    assert _cached_files(tmp_path / "hf", "alice/pair-GGUF") == {"pair-Q4_K_M.gguf"}
    assert router.client.post("/v1/chat/completions", json={"model": kept, **CHAT}).status_code == 200


def test_downloads_delete_of_a_sharded_model_takes_only_its_own_shards(start_router, hub: FakeHub,
                                                                       tmp_path: Path, tiny_model: Path) -> None:
    from tiny_model import write_tiny_model

    shard_a = tmp_path / "a.bin"
    shard_a.write_bytes(b"first shard")
    shard_b = tmp_path / "b.bin"
    shard_b.write_bytes(b"second shard")
    lookalike = write_tiny_model(tmp_path / "lookalike.gguf", seed=5)
    files = {"m-Q4_0-00001-of-00002.gguf": shard_a, "m-Q4_0-00002-of-00002.gguf": shard_b,
             "m-Q4_0_4_4.gguf": lookalike, "m-Q4_0-00001-of-00003.gguf": shard_a}
    hub.add_repo("alice/shards-GGUF", files)
    cache = tmp_path / "hf"
    for name in files:
        hf_hub_download("alice/shards-GGUF", name, cache_dir=cache, endpoint=hub.url)
    router = _router(start_router, hub, tmp_path)
    assert router.client.delete("/models", params={"model": "alice/shards-GGUF:Q4_0"}).json() == {"success": True}
    # Its two shards went; the Q4_0_4_4 file and a shard of another set (of 3) did not.
    assert _cached_files(cache, "alice/shards-GGUF") == {"m-Q4_0_4_4.gguf", "m-Q4_0-00001-of-00003.gguf"}
    left = {m["id"] for m in router.client.get("/models").json()["data"]}
    assert "alice/shards-GGUF:Q4_0_4_4" in left
    answer = router.client.post("/v1/chat/completions", json={"model": "alice/shards-GGUF:Q4_0_4_4", **CHAT})
    assert answer.status_code == 200


def test_downloads_a_failing_hub_is_a_502_not_a_bad_request(start_router, hub: FakeHub, tmp_path: Path) -> None:
    router = _router(start_router, hub, tmp_path)
    hub.fail_status = 503
    answer = router.client.post("/models", json={"model": REPO})
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert error["type"] == "server_error" and "unable to download" in error["message"]
    hub.fail_status = None
    assert router.client.post("/models", json={"model": "bob/missing-GGUF"}).status_code == 400


@pytest.mark.anyio
async def test_downloads_cleanup_leaves_a_projector_another_model_uses(hub: FakeHub, tmp_path: Path,
                                                                      tiny_model: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two quants of a repository download at once and both find the shared projector missing;
    one finishes, the other is cancelled. The cancelled one's cleanup must not take the projector
    (nor its blob) from the finished model: the state the review built, cleaned up for real."""
    import dataclasses

    from huggingface_hub import constants

    from router.downloads import Downloads, plan_download
    from router.events import EventHub
    from router.model_sources import SOURCE_CACHE, ModelSpec
    from router.registry import Registry
    from router.settings import RouterSettings
    from router.upstream_client import UpstreamClient

    cache = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    projector = tmp_path / "mmproj.gguf"
    projector.write_bytes(b"projector " * 1000)
    files = {"vis-Q4_K_M.gguf": tiny_model, "vis-Q8_0.gguf": tiny_model, "mmproj-vis-f16.gguf": projector}
    hub.add_repo("alice/vis-GGUF", files)
    paths = {name: hf_hub_download("alice/vis-GGUF", name, cache_dir=cache, endpoint=hub.url) for name in files}
    finished = ModelSpec(name="alice/vis-GGUF:Q4_K_M", source=SOURCE_CACHE,
                         options={"model": paths["vis-Q4_K_M.gguf"], "mmproj": paths["mmproj-vis-f16.gguf"]})
    cancelled = ModelSpec(name="alice/vis-GGUF:Q8_0", source=SOURCE_CACHE, options={"model": ""})
    registry = Registry(RouterSettings(), [finished, cancelled], EventHub(), UpstreamClient(5.0, 30.0))
    try:
        plan = plan_download("alice/vis-GGUF:Q8_0", list(files))
        assert plan.files == ("vis-Q8_0.gguf", "mmproj-vis-f16.gguf")
        await Downloads(registry, None).clean_up_after(registry.records[cancelled.name], plan,
                                                      list(plan.files), [])
        assert _cached_files(cache, "alice/vis-GGUF") == {"vis-Q4_K_M.gguf", "mmproj-vis-f16.gguf"}
        assert Path(paths["mmproj-vis-f16.gguf"]).read_bytes() == projector.read_bytes()
        # With no model using it, the projector goes with the download that brought it.
        registry.records[finished.name].spec = dataclasses.replace(finished, options={"model": "x"})
        await Downloads(registry, None).clean_up_after(registry.records[cancelled.name], plan,
                                                      list(plan.files), [])
        assert _cached_files(cache, "alice/vis-GGUF") == {"vis-Q4_K_M.gguf"}
    finally:
        registry.kill_all_now()
