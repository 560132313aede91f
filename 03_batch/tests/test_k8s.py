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

# compose service -> the workload that plays its role.
ROLES = {
    "mysql": ("StatefulSet", "mysql"),
    "api": ("Deployment", "api"),
    "job": ("CronJob", "predict"),
}
SECRET = "batch-mysql"  # MYSQL_PASSWORD and MYSQL_ROOT_PASSWORD, made by `kubectl create secret`

# Differences between the manifests and compose.yaml that are meant (role -> what, and why).
K8S_ONLY_ENV = {
    # Commented out in compose.yaml; here an optional Secret, so one `kubectl create secret`
    # turns the key on without editing a manifest.
    "api": {"API_KEY"},
}
COMPOSE_ONLY_ENV = {
    # Loop mode's wait between runs, and its metrics server's port: the CronJob's schedule is
    # the interval (checked below), and `--once` serves no metrics (gone before a scrape).
    "job": {"INTERVAL", "METRICS_PORT"},
}
K8S_ONLY_COMMAND = {
    # One pass and exit: the CronJob starts the next one.
    "job": ["--once"],
}
K8S_ONLY_ARGS = {
    # A volume has a fixed size; MySQL's default keeps 30 days of binary logs (mysql.yaml).
    "mysql": ["--binlog-expire-logs-seconds=259200"],
}
# compose publishes no port for MySQL (its network reaches it by name); the pod declares the one
# MYSQL_PORT calls.
K8S_ONLY_PORTS = {"mysql": "MYSQL_PORT"}


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(CHECK), str(CHAPTER)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"{CHECK.name} failed:\n{done.stderr}"
    listed: list[dict[str, Any]] = json.loads(done.stdout)
    return listed


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((CHAPTER / "compose.yaml").read_text())["services"]
    # The monitoring profile is compose's own; a cluster has its own monitoring.
    return {name: s for name, s in services.items() if "monitoring" not in s.get("profiles", [])}


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template: dict[str, Any] = spec["template"]["spec"]
    return template


def role_pod(objects: list[dict], role: str) -> dict:
    kind, name = ROLES[role]
    return pod(by_kind(objects, kind)[name])


# Any: a value is a str, or a dict for a Secret's reference (YAML, checked by each test).
def container_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, Any]:
    """Every variable: ConfigMap values, literal values, and a Secret's reference as a dict."""
    configmaps = by_kind(objects, "ConfigMap")
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def found(pattern: str, text: str) -> str:
    """The first group of pattern's first match in text; a test fails if there is none."""
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found"
    return match[1]


def compose_value(value: object) -> str | None:
    """compose's value as the container sees it: `${X:-d}` is d; `${X:?...}` (required from the
    shell: a password) is None."""
    value = str(value)
    if match := re.fullmatch(r"\$\{\w+:-([^}]*)\}", value):
        return match[1]
    return None if value.startswith("${") else value


def test_every_compose_role_is_here(objects: list[dict[str, Any]], compose: dict[str, Any]) -> None:
    assert set(compose) == set(ROLES)
    for kind, name in ROLES.values():
        assert name in by_kind(objects, kind), f"{kind}/{name}"
    assert set(by_kind(objects, "StatefulSet")) == {"mysql"}
    assert set(by_kind(objects, "Deployment")) == {"api"}
    assert set(by_kind(objects, "CronJob")) == {"predict", "backfill"}
    assert set(by_kind(objects, "Service")) == {"api", "mysql"}  # the job is called by none
    # No autoscaler for the API (api.yaml says why): fixed replicas, and a drain keeps one.
    assert not by_kind(objects, "HorizontalPodAutoscaler")
    api = by_kind(objects, "Deployment")["api"]
    (pdb,) = by_kind(objects, "PodDisruptionBudget").values()
    assert pdb["spec"]["selector"]["matchLabels"] == api["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] < api["spec"]["replicas"], "a drain can proceed"


def test_same_images_commands_ports_env_and_health_as_compose(
    objects: list[dict[str, Any]], compose: dict[str, Any]
) -> None:
    app_env = compose["api"]["environment"]
    for role, service in compose.items():
        spec = role_pod(objects, role)
        (container,) = spec["containers"]
        assert container["image"] == service["image"], role
        assert "initContainers" not in spec, role
        if role == "mysql":
            # compose's `command:` replaces the image's CMD and keeps its entrypoint: `args`.
            assert "command" not in container
            assert container["args"] == service["command"] + K8S_ONLY_ARGS[role]
        else:
            assert container["command"] == service["command"] + K8S_ONLY_COMMAND.get(role, [])
        ports = [p["containerPort"] for p in container.get("ports", [])]
        if role in K8S_ONLY_PORTS:
            assert ports == [int(app_env[K8S_ONLY_PORTS[role]])], role
        else:
            # "127.0.0.1:8000:8000": the container's port is the last part.
            assert ports == [int(p.rsplit(":", 1)[1]) for p in service.get("ports", [])], role
        env = container_env(container, objects)
        wanted = set(service["environment"]) - COMPOSE_ONLY_ENV.get(role, set())
        assert set(env) == wanted | K8S_ONLY_ENV.get(role, set()), role
        for key in wanted:
            value = compose_value(service["environment"][key])
            if value is None:  # a password from the shell: here from the Secret, same key
                assert env[key]["secretKeyRef"] == {"name": SECRET, "key": key}, f"{role}: {key}"
            else:
                assert env[key] == value, f"{role}: {key}"


def test_probes_are_compose_healthchecks(
    objects: list[dict[str, Any]], compose: dict[str, Any]
) -> None:
    """Readiness is compose's healthcheck: the same path, or the same command. The API's liveness
    is elsewhere on purpose: a path that needs neither the database nor the API key."""
    api = compose["api"]["healthcheck"]["test"]
    path = found(r"http://127\.0\.0\.1:\d+(/[\w/.-]*)", " ".join(api))
    (container,) = role_pod(objects, "api")["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": path, "port": "http"}
    liveness = container["livenessProbe"]["httpGet"]
    assert liveness["port"] == "http" and liveness["path"] != path
    # Open without API_KEY (api.py's RequireApiKey.OPEN), and not the database check.
    open_paths = found(r"OPEN = \{([^}]*)\}", (CHAPTER / "api.py").read_text())
    assert f'"{liveness["path"]}"' in open_paths
    routes = re.findall(r'Route\("([^"]+)", (\w+)', (CHAPTER / "api.py").read_text())
    assert (liveness["path"], "openapi") in routes

    mysql = compose["mysql"]["healthcheck"]["test"]
    assert mysql[0] == "CMD"
    (container,) = role_pod(objects, "mysql")["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command == mysql[1:], probe
        # No credentials on a probe's command line (ps shows argv).
        assert not any(re.match(r"-p|--password|-u|--user", part) for part in command), probe
    # The job has no port and no healthcheck, in compose as here.
    assert "healthcheck" not in compose["job"]
    (container,) = role_pod(objects, "job")["containers"]
    assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(container)


def test_models_reach_the_app_at_compose_path(
    objects: list[dict[str, Any]], compose: dict[str, Any]
) -> None:
    """compose mounts ../models at /models read-only; here the iris-model ConfigMap that the
    `kubectl create configmap` of kustomization.yaml makes (run client side), at the same path,
    holding the files MODEL_FILEPATH and LABEL_FILEPATH name."""
    comment = (K8S / "kustomization.yaml").read_text()
    files = found(r"create configmap iris-model \\\n#\s+(.*)\n", comment).split()
    done = subprocess.run(
        [str(KUBECTL), "create", "configmap", "iris-model", *files, "--dry-run=client"]
        + ["-o", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    created = json.loads(done.stdout)
    keys = set(created.get("data", {})) | set(created.get("binaryData", {}))
    assert len(done.stdout.encode()) < 1024 * 1024, "a ConfigMap holds 1 MiB at most"
    for role in ("api", "job"):
        assert compose[role]["volumes"] == ["../models:/models:ro"], role
        spec = role_pod(objects, role)
        (container,) = spec["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "models"]
        assert (mount["mountPath"], mount["readOnly"]) == ("/models", True), role
        (volume,) = [v for v in spec["volumes"] if v["name"] == "models"]
        assert volume["configMap"]["name"] == "iris-model", role
        env = container_env(container, objects)
        for variable in ("MODEL_FILEPATH", "LABEL_FILEPATH"):
            path = Path(env[variable])
            assert path.parent == Path("/models") and path.name in keys, f"{role}: {variable}"


def test_the_cronjob_runs_the_job_as_compose_loop_mode_did(
    objects: list[dict[str, Any]], compose: dict[str, Any]
) -> None:
    cron = by_kind(objects, "CronJob")["predict"]["spec"]
    # Every INTERVAL seconds (compose's default), in whole minutes as cron counts.
    given = compose_value(compose["job"]["environment"]["INTERVAL"])
    assert given is not None, "compose sets INTERVAL's default"
    interval = int(given)
    assert interval % 60 == 0
    minutes = interval // 60
    assert cron["schedule"] == ("* * * * *" if minutes == 1 else f"*/{minutes} * * * *")
    # No overlapping runs (job.yaml says why), and a late tick dropped within its period.
    assert cron["concurrencyPolicy"] == "Forbid"
    assert 0 < cron["startingDeadlineSeconds"] < interval
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    job = cron["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0, "the next tick is the retry"
    assert job["activeDeadlineSeconds"] > interval
    assert pod(by_kind(objects, "CronJob")["predict"])["restartPolicy"] == "Never"


def test_the_backfill_is_the_same_job_indexed_and_never_scheduled(
    objects: list[dict[str, Any]],
) -> None:
    crons = by_kind(objects, "CronJob")
    backfill = crons["backfill"]
    assert backfill["spec"]["suspend"] is True, "started by hand: kubectl create job --from"
    job = backfill["spec"]["jobTemplate"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"] > 1
    assert pod(backfill)["restartPolicy"] == "Never"  # backoffLimitPerIndex needs it
    # The same container as the minute's job (SKIP LOCKED shares the rows; no split by index).
    (ours,) = pod(backfill)["containers"]
    (theirs,) = pod(crons["predict"])["containers"]
    assert ours == theirs
    assert pod(backfill)["volumes"] == pod(crons["predict"])["volumes"]


def test_mysql_keeps_its_data_on_a_claim_and_is_reached_by_name(
    objects: list[dict[str, Any]], compose: dict[str, Any]
) -> None:
    mysql = by_kind(objects, "StatefulSet")["mysql"]
    spec = pod(mysql)
    (container,) = spec["containers"]
    (claim,) = mysql["spec"]["volumeClaimTemplates"]
    (compose_volume,) = compose["mysql"]["volumes"]  # mysql_data:/var/lib/mysql
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert mount["mountPath"] == compose_volume.split(":")[1]
    service = by_kind(objects, "Service")[mysql["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None", "headless"
    assert service["spec"]["selector"] == mysql["spec"]["selector"]["matchLabels"]
    # The apps call that Service on its port, as the user and database the image creates.
    (app,) = role_pod(objects, "job")["containers"]
    app_env, mysql_env = container_env(app, objects), container_env(container, objects)
    assert app_env["MYSQL_HOST"] == service["metadata"]["name"]
    assert [p["port"] for p in service["spec"]["ports"]] == [int(app_env["MYSQL_PORT"])]
    for key in ("MYSQL_USER", "MYSQL_DATABASE", "MYSQL_PASSWORD"):
        assert mysql_env[key] == app_env[key], key


def test_schema_sql_is_the_chapters_and_runs_at_the_first_start(
    objects: list[dict[str, Any]],
) -> None:
    """kustomize reads only k8s/, so it holds a copy: byte for byte ../schema.sql, mounted where
    the official image runs init scripts."""
    assert (K8S / "schema.sql").read_bytes() == (CHAPTER / "schema.sql").read_bytes()
    spec = pod(by_kind(objects, "StatefulSet")["mysql"])
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "initdb"]
    assert (mount["mountPath"], mount["readOnly"]) == ("/docker-entrypoint-initdb.d", True)
    (volume,) = [v for v in spec["volumes"] if v["name"] == "initdb"]
    data = by_kind(objects, "ConfigMap")[volume["configMap"]["name"]]["data"]
    assert data == {"schema.sql": (CHAPTER / "schema.sql").read_text()}


def test_the_secrets_the_pods_read_are_the_ones_the_comment_creates(
    objects: list[dict[str, Any]],
) -> None:
    """Every secretKeyRef names a Secret and key that kustomization.yaml's commands create."""
    comment = (K8S / "kustomization.yaml").read_text()
    refs: set[tuple[str, str]] = set()

    def walk(value: object) -> None:
        if isinstance(value, dict):
            if "secretKeyRef" in value:
                refs.add((value["secretKeyRef"]["name"], value["secretKeyRef"]["key"]))
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(objects)
    assert refs == {
        (SECRET, "MYSQL_PASSWORD"),
        (SECRET, "MYSQL_ROOT_PASSWORD"),
        ("batch-api-key", "API_KEY"),
    }
    for name, key in refs:
        (env_file,) = re.findall(
            rf"create secret generic {name} .*?--from-env-file=(\S+)", comment, re.S
        )
        written = found(
            rf"printf '([^']*)'[^>]*> {re.escape(env_file.replace('$HOME', '~'))}\)", comment
        )
        assert f"{key}=%s" in written, (name, key)


def test_scraped_where_metrics_are_served(objects: list[dict[str, Any]]) -> None:
    """The API is scraped on its own port where api.py routes /metrics. The job is not: with
    --once it serves no metrics (the process is gone before a scrape), nor does MySQL."""
    source = (CHAPTER / "api.py").read_text()
    serves = re.search(r'Route\("/metrics", ', source) is not None
    for role, (kind, name) in ROLES.items():
        workload = by_kind(objects, kind)[name]
        template = workload["spec"]
        if kind == "CronJob":
            template = template["jobTemplate"]["spec"]
        annotations = template["template"]["metadata"].get("annotations", {})
        if role == "api" and serves:
            (container,) = template["template"]["spec"]["containers"]
            assert annotations == {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(container["ports"][0]["containerPort"]),
                "prometheus.io/path": "/metrics",
            }
        else:
            assert "prometheus.io/scrape" not in annotations, f"{kind}/{name}"
    assert "prometheus.io/scrape" not in json.dumps(by_kind(objects, "CronJob")["backfill"])
