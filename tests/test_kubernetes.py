"""deploy/kubernetes/: valid against the Kubernetes API schemas, and true to the router it runs.

`kubernetes-validate` ships the API's JSON schemas, so no cluster is needed: every object is
checked strictly (an unknown field is an error). Then what the schema cannot know: the routers'
command lines parse, the front's peers name the node routers' headless Service, probes are on
/health, the key comes from the Secret, and the node's memory budget holds its preset's models by
the router's own estimate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from router.admission import context_of
from router.bundled_models import resolve_package_model
from router.memory import MIB, estimate_model_bytes
from router.model_sources import specs_from_preset
from router.presets import parse_preset_text
from router.settings import settings_from_args

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"
ROUTER_OVERHEAD_MIB = 256  # the node router itself, beside its children


def _objects() -> list[dict[str, Any]]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def _by_kind(kind: str, name: str) -> dict[str, Any]:
    return next(o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name)


def _memory_mib(quantity: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    return int(quantity[:-2]) * units[quantity[-2:]]


@pytest.mark.parametrize("obj", _objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_kubernetes_manifests_are_valid_objects(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_kubernetes_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def _parsed_args(container: dict[str, Any], tmp_path: Path) -> Any:
    """The container's flags through the router's own parser (files the pod mounts made here)."""
    key = tmp_path / "api-key"
    key.write_text("k\n")
    preset = tmp_path / "preset.ini"
    preset.write_text(_by_kind("ConfigMap", "modelyard-node-preset")["data"]["preset.ini"])
    args = [a.replace("/etc/modelyard-key/api-key", str(key)).replace("/etc/modelyard/preset.ini", str(preset))
            for a in container["args"]]
    settings, _ = settings_from_args(args)
    return settings


def test_kubernetes_front_follows_the_node_routers_through_the_headless_service(tmp_path: Path) -> None:
    service = _by_kind("Service", "modelyard-nodes")
    nodes = _by_kind("StatefulSet", "modelyard-node")
    front = _by_kind("Deployment", "modelyard-front")
    assert service["spec"]["clusterIP"] == "None" and nodes["spec"]["serviceName"] == "modelyard-nodes"
    assert service["spec"]["selector"] == nodes["spec"]["template"]["metadata"]["labels"]
    settings = _parsed_args(_container(front), tmp_path)
    assert settings.peers == (f"http://modelyard-nodes:{service['spec']['ports'][0]['port']}",)
    assert settings.models_preset is None  # a front serves its peers' models, none of its own
    public = _by_kind("Service", "modelyard")
    assert public["spec"]["selector"] == front["spec"]["template"]["metadata"]["labels"]
    for workload in (nodes, front):
        container = _container(workload)
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert _parsed_args(container, tmp_path).api_keys == ("k",)
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert mounts["api-key"] == "/etc/modelyard-key"
        assert volumes["api-key"]["secret"]["secretName"] == "modelyard-api-key"
    assert "cache" in {t["metadata"]["name"] for t in nodes["spec"]["volumeClaimTemplates"]}


def test_kubernetes_node_memory_holds_its_models_by_the_routers_estimate(tmp_path: Path) -> None:
    node = _container(_by_kind("StatefulSet", "modelyard-node"))
    settings = _parsed_args(node, tmp_path)
    specs = specs_from_preset(parse_preset_text(Path(settings.models_preset).read_text(),
                                                Path(settings.models_preset)), settings)
    need_mib = sum((estimate_model_bytes(resolve_package_model(s.model_value), context_of(s)) or 0)
                   for s in specs) / MIB
    assert need_mib > 0
    budget = settings.models_memory_mb
    limit = _memory_mib(node["resources"]["limits"]["memory"])
    request = _memory_mib(node["resources"]["requests"]["memory"])
    assert need_mib <= budget, f"the preset's models need about {need_mib:.0f} MiB, the budget is {budget:.0f}"
    assert budget + ROUTER_OVERHEAD_MIB <= limit
    assert need_mib + ROUTER_OVERHEAD_MIB <= request <= limit
