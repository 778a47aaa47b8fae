"""What users of llama.cpp's router and llama-swap already rely on: every route reaches its model
(by the body, a form field or ?model=), llama-swap's /upstream, per-model env, concurrency limits,
unlisted models, and a packaged default preset."""

from __future__ import annotations

from pathlib import Path

from conftest import fake_bin, tiny_preset


def test_any_post_reaches_the_model_its_body_form_or_query_names(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]) + f"[fake]\nmodel = {tiny_model}\nbin = {fake_bin()}\n")
    client = router.client
    # A route the router has no name for (a llama-server route with a slot id in its path).
    answer = client.post("/slots/0?action=save", json={"model": "fake", "filename": "x.bin"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["path"] == "/slots/0?action=save"
    # ?model= names it when the body does not (POST /props, /lora-adapters take no model field).
    answer = client.post("/lora-adapters?model=fake", json=[{"id": 0, "scale": 0.5}])
    assert answer.status_code == 200 and answer.json()["path"] == "/lora-adapters?model=fake"
    # A multipart form's `model` field (OpenAI's /v1/audio/transcriptions); the body goes as it came.
    files = {"file": ("a.wav", b"RIFF" + b"\0" * 4000, "audio/wav")}
    answer = client.post("/v1/audio/transcriptions", data={"model": "fake", "language": "en"}, files=files)
    assert answer.status_code == 200, answer.text
    echoed = answer.json()
    assert echoed["path"] == "/v1/audio/transcriptions" and echoed["content_type"].startswith("multipart/form-data")
    assert echoed["bytes"] > 4000
    # A body without a model, on one of the routes the router knows: ?model= names it.
    tokens = client.post("/tokenize?model=tiny", json={"content": "hello"})
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    # Nothing names a model: the router's 404, in the OpenAI shape.
    for body in ({"filename": "x"}, None):
        answer = client.post("/slots/0?action=save", json=body)
        assert answer.status_code == 404 and answer.json()["error"]["type"] == "not_found_error"
    answer = client.post("/v1/audio/transcriptions", files=files)
    assert answer.status_code == 404
    # A file where the model's name should be.
    answer = client.post("/v1/audio/transcriptions", files={"model": ("m", b"fake", "text/plain"), **files})
    assert answer.status_code == 400 and "'model'" in answer.json()["error"]["message"]
    # An unknown model named in a form: the same 400 as in a JSON body.
    answer = client.post("/v1/audio/transcriptions", data={"model": "nope"}, files=files)
    assert answer.status_code == 400 and "nope" in answer.json()["error"]["message"]


def test_upstream_reaches_a_models_own_routes_under_any_method(start_router, tiny_model: Path) -> None:
    router = start_router(tiny_preset(tiny_model, ["tiny"]) + f"[fake]\nmodel = {tiny_model}\nbin = {fake_bin()}\n")
    client = router.client
    page = client.get("/upstream/fake/some/page.js?v=2")
    assert page.status_code == 200, page.text
    assert page.json() == {"path": "/some/page.js?v=2", "model": "fake"}
    assert client.get("/upstream/fake").json()["path"] == "/"
    assert client.delete("/upstream/fake/slots/1").json() == {"path": "/slots/1", "model": "fake", "method": "DELETE"}
    # The real child: its own /props and /health, the model loaded on the way.
    props = client.get("/upstream/tiny/props")
    assert props.status_code == 200 and props.json()["model_alias"] == "tiny"
    assert router.status("tiny") == "loaded"
    missing = client.get("/upstream/nope/props")
    assert missing.status_code == 400 and "nope" in missing.json()["error"]["message"]
