"""k8s/ renders and validates offline, and agrees with compose.yaml (no cluster, no Docker).

Rendering and the checks every chapter shares (schemas of Kubernetes 1.30 and the newest, KEDA's
CRD schemas, current API versions, namespace, no secret in a manifest, resources,
securityContext) are the repository's tool ../.ci/k8s/check.py, run as a subprocess; what is
this chapter's own is checked here.
"""

import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

CHAPTER = Path(__file__).resolve().parents[1]
CHECK = CHAPTER.parent / ".ci" / "k8s" / "check.py"

# Differences between the manifests and compose.yaml that are meant (role -> what, and why).
K8S_ONLY_ENV = {
    # Commented out in compose.yaml; here an optional Secret, so one `kubectl create secret`
    # turns the key on without editing a manifest.
    "proxy": {"API_KEY"},
}
# compose publishes no port for these (its network reaches Redis by name, Prometheus scrapes the
# worker there); a pod declares them: the port REDIS_URL calls, and the worker's METRICS_PORT.
K8S_ONLY_PORTS = {"redis": ("proxy", "REDIS_URL"), "worker": ("worker", "METRICS_PORT")}
# The models travel in an image of their own (k8s/models.Dockerfile), copied by init containers;
# compose mounts ../models instead.
K8S_ONLY_IMAGES = {"ml-serving-patterns/sync-async-models:1"}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


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
    # The monitoring profile is compose's own; a cluster has its own monitoring.
    return {name: s for name, s in services.items() if "monitoring" not in s.get("profiles", [])}


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def workloads(objects: list[dict]) -> dict[str, dict]:
    return {name: o for kind in WORKLOAD_KINDS for name, o in by_kind(objects, kind).items()}


def pod(workload: dict) -> dict:
    spec: dict = workload["spec"]["template"]["spec"]
    return spec


def group(pattern: str, text: str, flags: int = 0) -> str:
    """The first group of pattern's first match in text, which must match."""
    match = re.search(pattern, text, flags)
    assert match, f"{pattern!r} not found"
    return match[1]


def container_env(container: dict, configmaps: dict[str, dict]) -> dict[str, str | dict]:
    """Every variable: ConfigMap values, literal values, and a Secret's reference as a dict."""
    env = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def env_of(objects: list[dict], role: str) -> dict:
    (container,) = pod(workloads(objects)[role])["containers"]
    return container_env(container, by_kind(objects, "ConfigMap"))


def test_every_compose_service_is_a_workload(objects: list[dict], compose: dict) -> None:
    assert set(workloads(objects)) == set(compose)
    assert set(by_kind(objects, "StatefulSet")) == {"redis"}
    assert set(by_kind(objects, "Service")) == {"proxy", "redis"}  # the worker is called by none


def test_same_images_commands_ports_env_and_health_as_compose(
    objects: list[dict], compose: dict
) -> None:
    for role, service in compose.items():
        spec = pod(workloads(objects)[role])
        (container,) = spec["containers"]
        assert container["image"] == service["image"], role
        assert {c["image"] for c in spec.get("initContainers", [])} <= K8S_ONLY_IMAGES, role
        # compose writes `$$` for a literal `$` (its own interpolation); Kubernetes does not.
        command = [part.replace("$$", "$") for part in service["command"]]
        assert container["command"] == command, role
        ports = [p["containerPort"] for p in container.get("ports", [])]
        if role in K8S_ONLY_PORTS:
            owner, variable = K8S_ONLY_PORTS[role]
            value = compose[owner]["environment"][variable]
            port = urlsplit(value).port if "://" in value else int(value)
            assert ports == [port], role
        else:
            assert ports == [int(p.rsplit(":", 1)[1]) for p in service.get("ports", [])], role
        env = env_of(objects, role)
        assert set(env) == set(service["environment"]) | K8S_ONLY_ENV.get(role, set()), role
        for key, value in service["environment"].items():
            if "${" in str(value):  # a password from the shell: here from the Secret
                assert env[key]["secretKeyRef"]["name"] == "redis-password", f"{role}: {key}"
            else:
                assert env[key] == str(value), f"{role}: {key}"
        # The readiness probe is compose's healthcheck: the same path, or the same command.
        test, probe = service["healthcheck"]["test"], container["readinessProbe"]
        if "httpGet" in probe:
            path = group(r"http://127\.0\.0\.1:\d+(/[\w/.-]*)", " ".join(test))
            assert probe["httpGet"] == {"path": path, "port": "http"}, role
        elif test[0] == "CMD-SHELL":
            assert probe["exec"]["command"] == ["sh", "-c", test[1]], role
        else:
            assert probe["exec"]["command"] == test[1:], role


def test_models_reach_each_role_at_compose_paths(objects: list[dict], compose: dict) -> None:
    """compose mounts ../models at /models; here an init container copies from the models image
    into an emptyDir at /models/imagenet exactly the files the role's *_PATH variables name."""
    dockerfile = (CHAPTER / "k8s" / "models.Dockerfile").read_text()
    (copied,) = re.findall(r"^COPY (.+) /models/imagenet/$", dockerfile, re.M)
    wanted = {"proxy": "SYNC_MODEL_PATH", "worker": "ASYNC_MODEL_PATH"}
    for role, variable in wanted.items():
        assert "../models:/models:ro" in compose[role]["volumes"]
        spec = pod(workloads(objects)[role])
        (init,) = spec["initContainers"]
        assert init["command"][0] == "cp" and init["command"][-1] == "/target/"
        files = init["command"][1:-1]
        env = env_of(objects, role)
        assert sorted(files) == sorted([env[variable], env["LABELS_PATH"]]), role
        assert {Path(f).name for f in files} <= set(copied.split()), role
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "models"]
        assert (mount["mountPath"], mount["readOnly"]) == ("/models/imagenet", True)
        assert all(Path(f).parent == Path(mount["mountPath"]) for f in files)


def test_keda_scales_the_worker_on_the_queue_and_the_claims(objects: list[dict]) -> None:
    env = env_of(objects, "worker")
    (scaled,) = by_kind(objects, "ScaledObject").values()
    assert scaled["spec"]["scaleTargetRef"] == {"name": "worker"}
    assert "replicas" not in workloads(objects)["worker"]["spec"], "KEDA owns replicas"
    triggers = scaled["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["redis", "redis"]
    queue = env["QUEUE_NAME"]
    assert [t["metadata"]["listName"] for t in triggers] == [queue, f"{queue}:processing"]
    # From zero only because the claims are watched too (worker.yaml says why).
    assert scaled["spec"]["minReplicaCount"] == 0
    assert int(triggers[1]["metadata"]["listLength"]) == int(env["NUM_WORKERS"])
    url = urlsplit(env["REDIS_URL"])
    namespace = scaled["metadata"]["namespace"]
    for trigger in triggers:
        address = f"{url.hostname}.{namespace}.svc.cluster.local:{url.port}"
        assert trigger["metadata"]["address"] == address
        assert trigger["metadata"]["databaseIndex"] == url.path.strip("/")
        assert trigger["authenticationRef"]["name"] == "redis-auth"
    (auth,) = by_kind(objects, "TriggerAuthentication").values()
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", **env["REDIS_PASSWORD"]["secretKeyRef"]}
    ]


def test_worker_grace_period_outlasts_its_sigterm_drain(objects: list[dict]) -> None:
    """worker.py on SIGTERM: the supervisor's loop ends (at most SUPERVISE_EVERY), each process
    finishes its job and BLMOVE's wait (BLOCK_SECONDS), and is killed after its join timeout."""
    source = (CHAPTER / "worker.py").read_text()
    block = float(group(r"^BLOCK_SECONDS = ([\d.]+)", source, re.M))
    every = float(group(r"^SUPERVISE_EVERY = ([\d.]+)", source, re.M))
    join = float(group(r"process\.join\(timeout=([\d.]+)\)", source))
    grace = pod(workloads(objects)["worker"])["terminationGracePeriodSeconds"]
    assert grace > every + block + join


def test_redis_keeps_its_data_on_a_claim_and_is_reached_by_name(
    objects: list[dict], compose: dict
) -> None:
    redis = by_kind(objects, "StatefulSet")["redis"]
    assert "--appendonly yes" in pod(redis)["containers"][0]["command"][2]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (compose_volume,) = compose["redis"]["volumes"]  # redis-data:/data
    (mount,) = [m for m in pod(redis)["containers"][0]["volumeMounts"] if m["name"] == "data"]
    assert (
        mount["mountPath"] == compose_volume.split(":")[1] and claim["metadata"]["name"] == "data"
    )
    service = by_kind(objects, "Service")[redis["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None", "headless"
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]


def test_pods_are_scraped_where_metrics_are_served(objects: list[dict], compose: dict) -> None:
    for role in ("proxy", "worker"):
        template = workloads(objects)[role]["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/path"] == "/metrics", role
        environment = compose[role]["environment"]
        # The worker's supervisor serves them on METRICS_PORT, the proxy on its own PORT.
        port = environment.get("METRICS_PORT") or environment["PORT"]
        assert annotations["prometheus.io/port"] == port, role


def test_proxy_scales_on_cpu_and_keeps_one_pod_through_a_drain(objects: list[dict]) -> None:
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "proxy"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    (pdb,) = by_kind(objects, "PodDisruptionBudget").values()
    labels = workloads(objects)["proxy"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain can proceed"
