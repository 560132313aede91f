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
from typing import Any

import pytest
import yaml

CHAPTER = Path(__file__).resolve().parents[1]
ROOT = CHAPTER.parent
CHECK = ROOT / ".ci" / "k8s" / "check.py"
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
K8S = CHAPTER / "k8s"

# Differences between the manifests and compose.yaml that are meant (flag -> why).
K8S_ONLY_ARGS = {
    # TensorFlow sizes its pools from the node's cores, not the pod's CPU limit.
    "--tensorflow_intra_op_parallelism": "2, the CPU limit",
    "--tensorflow_inter_op_parallelism": "2, the CPU limit",
    # One kept HTTP/2 connection sticks to one pod behind a Service; compose has one server.
    "--grpc_channel_arguments": "connections end after an age, so clients move to new pods",
}


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(CHECK), str(CHAPTER)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"{CHECK.name} failed:\n{done.stderr}"
    rendered: list[dict[str, Any]] = json.loads(done.stdout)
    return rendered


@pytest.fixture(scope="module")
def compose() -> dict:
    services = yaml.safe_load((CHAPTER / "compose.yaml").read_text())["services"]
    # The monitoring profile (Prometheus) is compose's own; a cluster has its own monitoring.
    return {name: s for name, s in services.items() if "monitoring" not in s.get("profiles", [])}


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def configmap(objects: list[dict], name: str) -> dict:
    """A ConfigMap by its rendered name: kustomize's, with the hash, which the pods refer to."""
    (found,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    return found


def container_env(container: dict, objects: list[dict]) -> dict[str, str | None]:
    env = {}
    for source in container.get("envFrom", []):
        env.update(configmap(objects, source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def pod_of(obj: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = obj["spec"]["template"]["spec"]
    return pod


def flag_value(args: list[str], flag: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{flag}=")]
    return value


def test_every_compose_role_is_here(objects: list[dict[str, Any]], compose: dict[str, Any]) -> None:
    """tfserving: a Deployment with its Service, HPA and PDB; the one-shot client: a Job."""
    assert set(compose) == {"tfserving", "client"}
    assert set(by_kind(objects, "Deployment")) == {"tfserving"}
    assert set(by_kind(objects, "Job")) == {"client"}
    assert set(by_kind(objects, "Service")) == {"tfserving", "tfserving-grpc"}
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tfserving",
    }
    assert "replicas" not in by_kind(objects, "Deployment")["tfserving"]["spec"], "the HPA's"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    (pdb,) = by_kind(objects, "PodDisruptionBudget").values()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_tfserving_as_compose_runs_it(
    objects: list[dict[str, Any]], compose: dict[str, Any]
) -> None:
    """Same image, flags (the entrypoint's arguments), ports, environment, health path, mounts."""
    service = compose["tfserving"]
    pod = pod_of(by_kind(objects, "Deployment")["tfserving"])
    (container,) = pod["containers"]
    assert container["image"] == service["image"]
    # compose's `command:` replaces the image's CMD and keeps its ENTRYPOINT: that is `args`.
    assert "command" not in container
    args = container["args"]
    assert args[: len(service["command"])] == service["command"]
    assert [a.split("=", 1)[0] for a in args[len(service["command"]) :]] == list(K8S_ONLY_ARGS)
    # "127.0.0.1:8500:8500": the container's port is the last part.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert sorted(ports.values()) == sorted(int(p.rsplit(":", 1)[1]) for p in service["ports"])
    assert container_env(container, objects) == service["environment"]
    # compose's healthcheck: bash's /dev/tcp/127.0.0.1/<port>, then `GET <path> HTTP/1.0`.
    test = " ".join(service["healthcheck"]["test"])
    probe_command = re.search(r"/dev/tcp/127\.0\.0\.1/(\d+) .*GET (\S+) HTTP", test)
    assert probe_command, test
    port, path = probe_command.groups()
    assert ports["rest"] == int(port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": path, "port": "rest"}, probe
    # Each compose mount (all read-only) at its path: a mounted directory, or a file of a
    # ConfigMap mounted as the directory holding it.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for volume in service["volumes"]:
        _, target, mode = volume.split(":")
        assert mode == "ro"
        if target in mounts:
            assert mounts[target]["readOnly"], target
            continue
        directory, name = target.rsplit("/", 1)
        mount = mounts[directory]
        assert mount["readOnly"], target
        source = volumes[mount["name"]]["configMap"]["name"]
        assert name in configmap(objects, source)["data"], target


def test_config_files_are_the_chapters(objects: list[dict[str, Any]]) -> None:
    """kustomize reads only k8s/, so it holds copies: byte for byte the files compose mounts."""
    pod = pod_of(by_kind(objects, "Deployment")["tfserving"])
    (volume,) = [v for v in pod["volumes"] if v["name"] == "flags"]
    flags = configmap(objects, volume["configMap"]["name"])["data"]
    assert set(flags) == {"batching.config", "monitoring.config"}
    for name, text in flags.items():
        assert (K8S / name).read_bytes() == (CHAPTER / name).read_bytes(), name
        assert text == (CHAPTER / name).read_text(), name
    (container,) = pod["containers"]
    for flag in ("--batching_parameters_file", "--monitoring_config_file"):
        assert flag_value(container["args"], flag).removeprefix("/config/") in flags, flag


def test_the_readme_command_makes_the_model_configmap_the_pod_mounts(
    objects: list[dict[str, Any]],
) -> None:
    """kustomization.yaml's `kubectl create configmap iris-model ...`, run (client side only):
    its keys are the four files of models/iris/1, each mounted back at its own path, and the
    whole fits a ConfigMap."""
    comment = (K8S / "kustomization.yaml").read_text()
    found = re.search(r"create configmap iris-model \\\n#\s+(.*)\n", comment)
    assert found, "kustomization.yaml has no `kubectl create configmap iris-model` comment"
    command = found[1].split()
    done = subprocess.run(
        [str(KUBECTL), "create", "configmap", "iris-model", *command, "--dry-run=client"]
        + ["-o", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    created = json.loads(done.stdout)
    keys = set(created.get("data", {})) | set(created.get("binaryData", {}))
    model_dir = ROOT / "models" / "iris"
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    pod = pod_of(by_kind(objects, "Deployment")["tfserving"])
    (volume,) = [v for v in pod["volumes"] if v["name"] == "model"]
    items = {item["key"]: item["path"] for item in volume["configMap"]["items"]}
    assert set(items) == keys
    assert set(items.values()) == files
    for key, path in items.items():
        assert path.rsplit("/", 1)[-1] == key
    assert len(done.stdout.encode()) < 1024 * 1024, "a ConfigMap holds 1 MiB at most"


def test_client_job_as_compose_runs_it(
    objects: list[dict[str, Any]], compose: dict[str, Any]
) -> None:
    service = compose["client"]
    job = by_kind(objects, "Job")["client"]
    pod = pod_of(job)
    (container,) = pod["containers"]
    assert container["image"] == service["image"]
    # The image has no ENTRYPOINT (python:3.11-slim's), so compose's command is the command.
    assert container["command"] == service["command"]
    assert "ports" not in service and "ports" not in container
    env = container_env(container, objects)
    assert env == service["environment"]
    # The host and ports it calls are the tfserving Service's.
    (tfserving,) = [
        s
        for s in by_kind(objects, "Service").values()
        if s["metadata"]["name"] == env["TF_SERVING_HOST"]
    ]
    ports = {p["name"]: p["port"] for p in tfserving["spec"]["ports"]}
    rest_port, grpc_port = env["TF_SERVING_REST_PORT"], env["TF_SERVING_GRPC_PORT"]
    assert rest_port and grpc_port, env
    assert ports == {"rest": int(rest_port), "grpc": int(grpc_port)}
    # One-shot, as compose's profile service: no restarts in place, retries while the server
    # is not ready yet (compose's depends_on: service_healthy), removed once done.
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] > 0
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_services_reach_the_container_ports(objects: list[dict[str, Any]]) -> None:
    (container,) = pod_of(by_kind(objects, "Deployment")["tfserving"])["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    services = by_kind(objects, "Service")
    for service in services.values():
        assert service["spec"]["selector"] == {"app": "tfserving"}
        for port in service["spec"]["ports"]:
            assert port["port"] == ports[port["targetPort"]] and port["targetPort"] == port["name"]
    assert services["tfserving-grpc"]["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in services["tfserving-grpc"]["spec"]["ports"]] == ["grpc"]


def test_pods_leave_after_their_grpc_connections(objects: list[dict[str, Any]]) -> None:
    """preStop outlasts a connection's maximum age (gRPC adds up to 10% jitter) plus its grace,
    so every client has reconnected elsewhere before SIGTERM; the grace period outlasts both."""
    pod = pod_of(by_kind(objects, "Deployment")["tfserving"])
    (container,) = pod["containers"]
    channel = dict(
        item.split("=")
        for item in flag_value(container["args"], "--grpc_channel_arguments").split(",")
    )
    age_s = int(channel["grpc.max_connection_age_ms"]) * 1.1 / 1000
    grace_s = int(channel["grpc.max_connection_age_grace_ms"]) / 1000
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause >= age_s + grace_s
    assert pod["terminationGracePeriodSeconds"] > pause


def test_scraped_where_tfserving_serves_its_metrics(objects: list[dict[str, Any]]) -> None:
    """The annotations name monitoring.config's path on the REST port, as prometheus.yml does."""
    template = by_kind(objects, "Deployment")["tfserving"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    (container,) = template["spec"]["containers"]
    monitoring = (CHAPTER / "monitoring.config").read_text()
    configured = re.search(r'path: "([^"]+)"', monitoring)
    assert configured, monitoring
    assert annotations["prometheus.io/path"] == configured[1]
    (job,) = yaml.safe_load((CHAPTER / "prometheus.yml").read_text())["scrape_configs"]
    assert annotations["prometheus.io/path"] == job["metrics_path"]
    rest = [p["containerPort"] for p in container["ports"] if p["name"] == "rest"]
    assert [int(annotations["prometheus.io/port"])] == rest
