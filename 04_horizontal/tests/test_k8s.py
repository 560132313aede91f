"""k8s/ renders and validates offline, and agrees with compose.yaml (no cluster, no Docker).

Rendering and the checks every chapter shares (schemas of Kubernetes 1.30 and the newest, current
API versions, namespace, no secret in a manifest, resources, securityContext) are the repository's
tool ../.ci/k8s/check.py, run as a subprocess; what is this chapter's own is checked here.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CHAPTER = Path(__file__).resolve().parents[1]
CHECK = CHAPTER.parent / ".ci" / "k8s" / "check.py"

# Differences between the manifests and compose.yaml that are meant (name -> why).
K8S_ONLY_ENV = {
    # Commented out in compose.yaml; here an optional Secret, so one `kubectl create secret`
    # turns the key on without editing a manifest.
    "API_KEY",
}


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    done = subprocess.run(
        [sys.executable, str(CHECK), str(CHAPTER)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"{CHECK.name} failed:\n{done.stderr}"
    rendered: list[dict] = json.loads(done.stdout)
    return rendered


@pytest.fixture(scope="module")
def compose() -> dict:
    services = yaml.safe_load((CHAPTER / "compose.yaml").read_text())["services"]
    # The monitoring profile (Prometheus) is compose's own; a cluster has its own monitoring.
    return {name: s for name, s in services.items() if "monitoring" not in s.get("profiles", [])}


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def image_commands() -> dict[str, list[str]]:
    """The CMD of each Dockerfile stage, by the image compose builds from it."""
    stages, stage = {}, None
    for line in (CHAPTER / "Dockerfile").read_text().splitlines():
        if match := re.match(r"FROM \S+ AS (\w+)", line):
            stage = match[1]
        elif line.startswith("CMD "):
            stages[stage] = json.loads(line[4:])
    services = yaml.safe_load((CHAPTER / "compose.yaml").read_text())["services"]
    return {s["image"]: stages[s["build"]["target"]] for s in services.values() if "build" in s}


def container_env(container: dict, configmaps: dict[str, dict]) -> dict[str, str | None]:
    """Every variable the container gets: its env (None for a Secret's) and its ConfigMaps'."""
    env = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def health_path(compose_service: dict) -> str:
    test = " ".join(compose_service["healthcheck"]["test"])
    match = re.search(r"http://127\.0\.0\.1:[^/']+(/[\w/.-]*)", test)
    assert match, test
    return match[1]


def services_setting(setting: str | None) -> dict[str, str]:
    """SERVICES, "name=url,name=url", as {name: url}."""
    assert setting, "SERVICES is not set"
    return {name: url for name, _, url in (item.partition("=") for item in setting.split(","))}


def test_every_compose_service_is_a_deployment_and_a_service(
    objects: list[dict], compose: dict
) -> None:
    deployments = by_kind(objects, "Deployment")
    # Kubernetes names are DNS labels: service_setosa becomes service-setosa.
    assert set(deployments) == {name.replace("_", "-") for name in compose}
    assert set(by_kind(objects, "Service")) == set(deployments)
    autoscalers = by_kind(objects, "HorizontalPodAutoscaler")
    assert set(autoscalers) == set(deployments), "each role scales on its own"
    for name, hpa in autoscalers.items():
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert "replicas" not in deployments[name]["spec"], f"{name}: the HPA owns replicas"
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"


def test_same_images_commands_ports_env_and_health_as_compose(
    objects: list[dict], compose: dict
) -> None:
    deployments = by_kind(objects, "Deployment")
    configmaps = by_kind(objects, "ConfigMap")
    commands = image_commands()
    for name, service in compose.items():
        pod = deployments[name.replace("_", "-")]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == service["image"], name
        assert container["command"] == service.get("command", commands[service["image"]]), name
        # "127.0.0.1::8000" and "127.0.0.1:9000:9000": the container's port is the last part.
        compose_ports = [int(p.rsplit(":", 1)[1]) for p in service.get("ports", [])]
        assert [p["containerPort"] for p in container["ports"]] == compose_ports, name
        env = container_env(container, configmaps)
        assert set(env) == set(service["environment"]) | K8S_ONLY_ENV, name
        for key, value in service["environment"].items():
            if key != "SERVICES":  # the addresses differ: see the next test
                assert env[key] == value, f"{name}: {key}"
        path = health_path(service)
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": path, "port": "http"}, name
        # compose mounts ../models at /models; here the same path, from the iris-models ConfigMap.
        compose_mounts = [v.split(":")[1] for v in service.get("volumes", [])]
        mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "models"]
        assert mounts == compose_mounts, name


def test_services_setting_names_the_cluster_services(objects: list[dict], compose: dict) -> None:
    """Same names and ports as compose's SERVICES, each host a Service of the manifests whose
    port is the one the URL calls, and whose pods listen there."""
    services = by_kind(objects, "Service")
    (proxy,) = by_kind(objects, "Deployment")["proxy"]["spec"]["template"]["spec"]["containers"]
    env = container_env(proxy, by_kind(objects, "ConfigMap"))
    ours = services_setting(env["SERVICES"])
    theirs = services_setting(compose["proxy"]["environment"]["SERVICES"])
    assert list(ours) == list(theirs)
    for label, url in ours.items():
        match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url)
        assert match, url
        host, port = match.groups()
        assert host in services, url
        assert services[host]["spec"]["ports"][0]["port"] == int(port), url
        assert theirs[label].endswith(f":{port}"), url


def test_each_specialist_mounts_its_own_model_from_models(objects: list[dict]) -> None:
    """The keys the pods expect are files of ../models, the ones the README's
    `kubectl create configmap iris-models --from-file=...` puts in."""
    for name, deployment in by_kind(objects, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        if "models" not in volumes:
            continue
        mode = container_env(pod["containers"][0], by_kind(objects, "ConfigMap"))["MODE"]
        keys = [item["key"] for item in volumes["models"]["configMap"]["items"]]
        assert keys == [f"iris_svc_0_{mode}.onnx", "label.json"], name
        for key in keys:
            assert (CHAPTER.parent / "models" / key).is_file(), key


def test_pods_are_scraped_where_metrics_are_served(objects: list[dict]) -> None:
    for name, deployment in by_kind(objects, "Deployment").items():
        template = deployment["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        (container,) = template["spec"]["containers"]
        assert annotations["prometheus.io/path"] == "/metrics", name
        assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]
