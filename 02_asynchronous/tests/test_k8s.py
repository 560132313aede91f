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
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

CHAPTER = Path(__file__).resolve().parents[1]
ROOT = CHAPTER.parent
CHECK = ROOT / ".ci" / "k8s" / "check.py"
K8S = CHAPTER / "k8s"

# Differences between the manifests and compose.yaml that are meant (and why).
K8S_ONLY_ENV = {
    # Commented out in compose.yaml; here an optional Secret, so one `kubectl create secret`
    # turns the key on without editing a manifest.
    "proxy": {"API_KEY"},
}
# compose's service tensorflow_serving: a Service name may not hold "_" (DNS-1035), so the
# Kubernetes name has "-" and TF_SERVING_HOST names it so.
K8S_VALUE = {"TF_SERVING_HOST": lambda value: value.replace("_", "-")}
# TensorFlow Serving's arguments, none in compose (tfserving.yaml says why).
K8S_ONLY_ARGS = {
    "--tensorflow_intra_op_parallelism": "TensorFlow sizes its pools from the node's cores",
    "--tensorflow_inter_op_parallelism": "TensorFlow sizes its pools from the node's cores",
    "--grpc_channel_arguments": "each worker's one gRPC connection would stay on one pod",
}
# compose publishes no port for these (its network reaches them by name, Prometheus scrapes the
# worker there): a pod declares the ports its callers use, named by the callers' variables.
K8S_ONLY_PORTS = {
    "redis": [("proxy", "REDIS_URL")],
    "tensorflow_serving": [("worker", "TF_SERVING_GRPC_PORT"), ("proxy", "TF_SERVING_REST_PORT")],
    "worker": [("worker", "METRICS_PORT")],
}
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


def k8s_name(role: str) -> str:
    return role.replace("_", "-")


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def workloads(objects: list[dict]) -> dict[str, dict]:
    return {name: o for kind in WORKLOAD_KINDS for name, o in by_kind(objects, kind).items()}


def pod(objects: list[dict], role: str) -> dict:
    spec: dict = workloads(objects)[k8s_name(role)]["spec"]["template"]["spec"]
    return spec


def env_of(objects: list[dict], role: str) -> dict[str, Any]:
    """Every variable: ConfigMap values, literal values, and a Secret's reference as a dict
    (parsed YAML: a str or a dict, as the key says)."""
    (container,) = pod(objects, role)["containers"]
    configmaps = by_kind(objects, "ConfigMap")
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def found(pattern: str, text: str, flags: int = 0) -> re.Match[str]:
    match = re.search(pattern, text, flags)
    assert match is not None, f"{pattern!r} not found"
    return match


def source_constant(path: str, pattern: str) -> str:
    return found(pattern, (CHAPTER / path).read_text(), re.M)[1]


def setting(compose: dict, role: str, variable: str) -> str:
    """A variable as the role sees it in compose: its value there, else config.py's default."""
    environment = compose[role].get("environment", {})
    if variable in environment:
        return str(environment[variable])
    return source_constant("config.py", rf'env\("{variable}", "(.*?)"\)')


def test_every_compose_service_is_a_workload(objects: list[dict], compose: dict) -> None:
    assert set(workloads(objects)) == {k8s_name(role) for role in compose}
    assert set(by_kind(objects, "StatefulSet")) == {"redis"}
    # Everyone but the worker is called by someone; the worker calls, and is called by none.
    assert set(by_kind(objects, "Service")) == {k8s_name(r) for r in compose} - {"worker"}


def test_same_images_commands_ports_env_and_health_as_compose(
    objects: list[dict], compose: dict
) -> None:
    for role, service in compose.items():
        (container,) = pod(objects, role)["containers"]
        assert container["image"] == service["image"], role
        if "command" in service:
            # compose writes `$$` for a literal `$` (its own interpolation); Kubernetes does not.
            assert container["command"] == [p.replace("$$", "$") for p in service["command"]]
            assert "args" not in container, role
        else:  # the image's entrypoint, as in compose; only the allowed flags appended
            assert "command" not in container, role
            flags = [a.split("=", 1)[0] for a in container.get("args", [])]
            assert flags == (list(K8S_ONLY_ARGS) if role == "tensorflow_serving" else []), role
        ports = sorted(p["containerPort"] for p in container.get("ports", []))
        wanted = [int(p.rsplit(":", 1)[1]) for p in service.get("ports", [])]
        for owner, variable in K8S_ONLY_PORTS.get(role, []):
            value = setting(compose, owner, variable)
            extra = urlsplit(value).port if "://" in value else int(value)
            assert extra is not None, f"{owner} {variable}={value}: no port"
            wanted.append(extra)
        assert ports == sorted(wanted), role
        env = env_of(objects, role)
        environment = service.get("environment", {})
        assert set(env) == set(environment) | K8S_ONLY_ENV.get(role, set()), role
        for key, value in environment.items():
            if "${" in str(value):  # a password from the shell: here from the Secret
                assert env[key]["secretKeyRef"]["name"] == "redis-password", f"{role}: {key}"
            else:
                assert env[key] == K8S_VALUE.get(key, str)(str(value)), f"{role}: {key}"
        # The readiness probe is compose's healthcheck: the same path, or the same command.
        if "healthcheck" not in service:  # the worker: nothing to probe, there or here
            assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(container)
            continue
        test, probe = service["healthcheck"]["test"], container["readinessProbe"]
        joined = " ".join(test)
        if "/dev/tcp/" in joined:  # bash's /dev/tcp/127.0.0.1/<port>, then GET <path>
            port, path = found(r"/dev/tcp/127\.0\.0\.1/(\d+) .*GET (\S+) HTTP", joined).groups()
            named = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert named[probe["httpGet"]["port"]] == int(port), role
            assert probe["httpGet"]["path"] == path, role
        elif "httpGet" in probe:
            path = found(r"http://127\.0\.0\.1:\d+(/[\w/.-]*)", joined)[1]
            assert probe["httpGet"] == {"path": path, "port": "http"}, role
        elif test[0] == "CMD-SHELL":
            assert probe["exec"]["command"] == ["sh", "-c", test[1]], role
        else:
            assert probe["exec"]["command"] == test[1:], role


def test_every_service_reaches_its_pods_by_the_names_the_callers_use(
    objects: list[dict], compose: dict
) -> None:
    env = env_of(objects, "worker")
    services = by_kind(objects, "Service")
    tf = services[env["TF_SERVING_HOST"]]
    assert tf["spec"]["selector"].items() <= pod_labels(objects, "tensorflow_serving").items()
    tf_ports = {p["port"] for p in tf["spec"]["ports"]}
    assert {int(env["TF_SERVING_GRPC_PORT"]), int(env["TF_SERVING_REST_PORT"])} <= tf_ports
    url = urlsplit(env["REDIS_URL"])
    assert url.port in {p["port"] for p in services[url.hostname]["spec"]["ports"]}
    assert services["proxy"]["spec"]["ports"][0]["port"] == int(env["PORT"])


def pod_labels(objects: list[dict], role: str) -> dict:
    labels: dict = workloads(objects)[k8s_name(role)]["spec"]["template"]["metadata"]["labels"]
    return labels


def test_models_reach_each_role_at_compose_paths(objects: list[dict], compose: dict) -> None:
    """compose mounts ../models (the labels) and ../models/iris (the SavedModel) read-only; here
    ConfigMaps, mounted read-only at the same paths."""
    configmaps = by_kind(objects, "ConfigMap")
    for role, service in compose.items():
        spec = pod(objects, role)
        mounts = {m["mountPath"]: m for m in spec["containers"][0].get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            if not source.startswith("../"):
                continue  # a named volume: Redis's claim, below
            assert mode == ["ro"] and mounts[target]["readOnly"], f"{role}: {target}"
            configmap = volumes[mounts[target]["name"]]["configMap"]
            if source == "../models":  # only label.json is read from it: LABELS_PATH
                labels = Path(env_of(objects, role)["LABELS_PATH"])
                assert labels.parent == Path(target), role
                assert set(configmaps[configmap["name"]]["data"]) == {labels.name}, role
            else:  # ../models/iris: every file of the SavedModel, at its path
                assert configmap["name"] == "iris-model"
                files = sorted(
                    str(p.relative_to(CHAPTER / source))
                    for p in (CHAPTER / source).rglob("*")
                    if p.is_file()
                )
                assert sorted(item["path"] for item in configmap["items"]) == files, role
                assert all(Path(i["path"]).name == i["key"] for i in configmap["items"]), role


def test_the_labels_copy_is_the_models(objects: list[dict]) -> None:
    """kustomize reads only k8s/, so it holds a copy: byte for byte ../models/label.json."""
    assert (K8S / "label.json").read_bytes() == (ROOT / "models" / "label.json").read_bytes()
    (labels,) = [o for o in objects if o["kind"] == "ConfigMap" and "label.json" in o["data"]]
    assert labels["data"]["label.json"] == (ROOT / "models" / "label.json").read_text()


def test_keda_scales_the_worker_on_the_queue_and_the_claims(objects: list[dict]) -> None:
    env = env_of(objects, "worker")
    (scaled,) = by_kind(objects, "ScaledObject").values()
    assert scaled["spec"]["scaleTargetRef"] == {"name": "worker"}
    assert "replicas" not in workloads(objects)["worker"]["spec"], "KEDA owns replicas"
    triggers = scaled["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["redis", "redis"]
    # The queue's name: QUEUE_NAME if set, else config.py's default; the processing list is
    # named after it in jobs.py, and it is the list the reaper walks.
    queue = env.get("QUEUE_NAME") or source_constant("config.py", r'env\("QUEUE_NAME", "(.+?)"\)')
    processing = source_constant("jobs.py", r'self\.processing = f"\{queue\}(.+?)"')
    assert "LRANGE', KEYS[2]" in (CHAPTER / "jobs.py").read_text(), "REAP walks processing"
    assert [t["metadata"]["listName"] for t in triggers] == [queue, queue + processing]
    # From zero only because the claims are watched too (worker.yaml says why).
    assert scaled["spec"]["minReplicaCount"] == 0
    claims_per_pod = int(env["BATCH_SIZE"]) * int(env["NUM_WORKERS"])
    assert int(triggers[1]["metadata"]["listLength"]) == claims_per_pod
    assert "activationListLength" not in triggers[1]["metadata"], "any claim keeps a pod"
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
    """worker.py on SIGTERM finishes the batch in hand: at worst BLMOVE, CLAIM, REQUEUE and
    FINISH each take the Redis socket timeout, and one Predict its PREDICT_TIMEOUT."""
    env = env_of(objects, "worker")
    assert int(env["NUM_WORKERS"]) == 1, "one process: no supervisor's join in the drain"
    block = float(source_constant("worker.py", r"^BLOCK_SECONDS = ([\d.]+)"))
    extra = float(source_constant("worker.py", r"socket_timeout=BLOCK_SECONDS \+ ([\d.]+)"))
    predict = float(
        env.get("PREDICT_TIMEOUT")
        or source_constant("config.py", r'env\("PREDICT_TIMEOUT", "([\d.]+)"\)')
    )
    drain = 4 * (block + extra) + predict
    grace = pod(objects, "worker")["terminationGracePeriodSeconds"]
    assert grace > drain


def test_redis_keeps_its_data_on_a_claim_and_is_reached_by_name(
    objects: list[dict], compose: dict
) -> None:
    redis = by_kind(objects, "StatefulSet")["redis"]
    (container,) = pod(objects, "redis")["containers"]
    script = container["command"][2]
    assert "--appendonly yes" in script
    # The password reaches redis-server on stdin (the here-document), not in its argv.
    argv, stdin = script.split("<<EOF")
    assert "requirepass" not in argv and "REDIS_PASSWORD" not in argv
    assert 'requirepass "$REDIS_PASSWORD"' in stdin, "from the Secret's variable"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (compose_volume,) = compose["redis"]["volumes"]  # redis-data:/data
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "data"]
    assert mount["mountPath"] == compose_volume.split(":")[1]
    assert claim["metadata"]["name"] == "data"
    service = by_kind(objects, "Service")[redis["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None", "headless"
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]


def test_pods_are_scraped_only_where_metrics_are_served(objects: list[dict], compose: dict) -> None:
    serves = {
        # The proxy serves them on its own PORT if it has the route; a worker on METRICS_PORT.
        "proxy": 'Route("/metrics"' in (CHAPTER / "proxy.py").read_text() and "PORT",
        "worker": "start_http_server(settings.metrics_port" in (CHAPTER / "worker.py").read_text()
        and "METRICS_PORT",
    }
    for role, variable in serves.items():
        annotations = workloads(objects)[role]["spec"]["template"]["metadata"].get(
            "annotations", {}
        )
        if not variable:
            assert "prometheus.io/scrape" not in annotations, role
            continue
        assert annotations["prometheus.io/path"] == "/metrics", role
        assert annotations["prometheus.io/port"] == setting(compose, role, variable), role


def test_proxy_scales_on_cpu_and_keeps_one_pod_through_a_drain(objects: list[dict]) -> None:
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    assert set(hpas) == {"proxy"}
    hpa = hpas["proxy"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "proxy",
    }
    assert "replicas" not in workloads(objects)["proxy"]["spec"], "the HPA's"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    pdbs = by_kind(objects, "PodDisruptionBudget")
    for name, pdb in pdbs.items():
        labels = workloads(objects)[name]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    assert pdbs["proxy"]["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain proceeds"
    tf = workloads(objects)["tensorflow-serving"]["spec"]
    assert pdbs["tensorflow-serving"]["spec"]["minAvailable"] < tf["replicas"]


def test_the_kustomization_command_makes_the_model_configmap_the_pod_mounts(
    objects: list[dict],
) -> None:
    """kustomization.yaml's `kubectl create configmap iris-model ...`, run client side only: its
    keys are exactly the items tfserving.yaml mounts, and it fits a ConfigMap."""
    comment = (K8S / "kustomization.yaml").read_text()
    command = found(r"create configmap iris-model \\\n#\s+(.*)\n", comment)[1].split()
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "kubectl"), "create", "configmap", "iris-model", *command]
        + ["--dry-run=client", "-o", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    created = json.loads(done.stdout)
    keys = set(created.get("data", {})) | set(created.get("binaryData", {}))
    (volume,) = [v for v in pod(objects, "tensorflow_serving")["volumes"] if v["name"] == "model"]
    assert {item["key"] for item in volume["configMap"]["items"]} == keys
    assert len(done.stdout.encode()) < 1024 * 1024, "a ConfigMap holds 1 MiB at most"
