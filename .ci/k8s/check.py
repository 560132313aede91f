"""Render one chapter's k8s/ with kustomize and validate every object offline; print them as JSON.

    .venv/bin/python .ci/k8s/check.py 04_horizontal          # exit 0: the objects on stdout

Each chapter's tests/test_k8s.py runs this as a subprocess (a chapter imports no code from
outside itself) and then checks what only the chapter knows: that the manifests agree with its
compose.yaml. What is the same for every chapter lives here, once:

- `kubectl kustomize` (the kubectl of .venv, pinned in requirements-dev.txt) renders the folder;
- core kinds validate in strict mode (an unknown field is an error) against the schemas of
  Kubernetes 1.30 and of the newest version kubernetes-validate bundles; a kind it has no schema
  for is a failure, not a warning;
- KEDA kinds validate against KEDA's own CRD schemas, unknown fields refused as in strict mode
  (`../shared/schemas/keda-v2.20.2/` beside the repository: CI copies shared/ there);
- every apiVersion is a current one (the book's CronJob used batch/v1beta1, gone since 1.25);
- rules every chapter keeps: everything in the chapter's Namespace, no password or key written
  into a manifest, every container with requests and limits and a locked-down securityContext.

Failures go to stderr, one per line, and the exit status is 1.
"""

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
KEDA_SCHEMAS = ROOT.parent / "shared" / "schemas" / "keda-v2.20.2"
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())

# The API versions in use today for the kinds these chapters need. Anything else (batch/v1beta1,
# autoscaling/v2beta2, policy/v1beta1, extensions/v1beta1, ...) is removed or on its way out.
CURRENT_API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "ServiceAccount": "v1",
    "PersistentVolumeClaim": "v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "Job": "batch/v1",
    "CronJob": "batch/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
}
KEDA_KINDS = {"ScaledObject": "scaledobjects", "TriggerAuthentication": "triggerauthentications"}
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"Deployment", "StatefulSet", "Job", "CronJob"}
SECRET_WORDS = ("PASSWORD", "API_KEY", "TOKEN", "SECRET")


def render(chapter: Path) -> list[dict]:
    done = subprocess.run(
        [str(KUBECTL), "kustomize", str(chapter / "k8s")], capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"kubectl kustomize {chapter}/k8s failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def keda_schema(kind: str) -> dict:
    path = KEDA_SCHEMAS / f"keda.sh_{KEDA_KINDS[kind]}.yaml"
    if not path.exists():
        sys.exit(f"{path} is missing: KEDA's CRD schemas are expected in ../shared/schemas")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare: kubectl's strict field validation refuses them (a
    typo such as `minReplicaCont` would otherwise pass a plain JSON Schema check)."""
    if isinstance(value, list):
        items = schema.get("items", {})
        return [e for i, v in enumerate(value) for e in unknown_fields(v, items, f"{path}.{i}")]
    if not isinstance(value, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if "properties" not in schema:  # a map (additionalProperties) or a free-form object
        extra = schema.get("additionalProperties")
        extra = extra if isinstance(extra, dict) else {}
        return [e for k, v in value.items() for e in unknown_fields(v, extra, f"{path}.{k}")]
    errors = []
    for key, item in value.items():
        if key not in schema["properties"]:
            errors.append(f"{path}.{key}".lstrip("."))
        else:
            errors += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
    return errors


def pod_spec(obj: dict) -> dict | None:
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec.get("template", {}).get("spec") if obj["kind"] in WORKLOADS else None


def container_rules(name: str, pod: dict) -> list[str]:
    """Requests and limits, non-root, no privilege escalation, no capabilities; no literal
    secret in an environment variable."""
    errors = []
    pod_context = pod.get("securityContext", {})
    for c in pod.get("initContainers", []) + pod["containers"]:
        where = f"{name} container {c['name']}"
        resources = c.get("resources", {})
        for part in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(part, {}):
                    errors.append(f"{where}: no {part}.{resource}")
        context = c.get("securityContext", {})
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            errors.append(f"{where}: runAsNonRoot is not true")
        if context.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{where}: allowPrivilegeEscalation is not false")
        if context.get("capabilities", {}).get("drop") != ["ALL"]:
            errors.append(f"{where}: capabilities.drop is not [ALL]")
        for env in c.get("env", []):
            if any(word in env["name"].upper() for word in SECRET_WORDS) and "value" in env:
                errors.append(f"{where}: {env['name']} has a literal value (use a secretKeyRef)")
    return errors


def check(objects: list[dict]) -> list[str]:
    errors = []
    namespaces = {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"}
    if len(namespaces) != 1:
        errors.append(f"expected exactly one Namespace, found {sorted(namespaces)}")
    for obj in objects:
        kind, name = obj["kind"], f"{obj['kind']}/{obj['metadata']['name']}"
        wanted = CURRENT_API_VERSIONS.get(kind)
        if wanted is None:
            errors.append(f"{name}: kind not in the list of checked kinds")
        elif obj["apiVersion"] != wanted:
            errors.append(f"{name}: apiVersion {obj['apiVersion']}, current is {wanted}")
        if kind not in CLUSTER_SCOPED and obj["metadata"].get("namespace") not in namespaces:
            errors.append(f"{name}: not in the chapter's Namespace")
        if kind == "Secret" and (obj.get("data") or obj.get("stringData")):
            errors.append(f"{name}: a Secret with data in the manifests")
        if kind in KEDA_KINDS:
            schema = keda_schema(kind)
            try:
                jsonschema.validate(obj, schema)
            except jsonschema.ValidationError as exc:
                path = ".".join(map(str, exc.absolute_path))
                errors.append(f"{name}: KEDA schema: {path}: {exc.message}")
            # metadata is the object's own (the CRD schema leaves it open); the rest strictly.
            spec_only = {k: v for k, v in obj.items() if k != "metadata"}
            for field in unknown_fields(spec_only, schema):
                errors.append(f"{name}: KEDA schema: unknown field {field}")
        else:
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    path = ".".join(map(str, exc.path))
                    errors.append(f"{name}: Kubernetes {version}: {path}: {exc.message}")
                except kubernetes_validate.SchemaNotFoundError as exc:
                    errors.append(f"{name}: {exc.message}")
        pod = pod_spec(obj)
        if pod is not None:
            errors += container_rules(name, pod)
    return errors


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: check.py <chapter folder>")
    objects = render(Path(sys.argv[1]).resolve())
    errors = check(objects)
    if errors:
        sys.exit("\n".join(errors))
    json.dump(objects, sys.stdout)


if __name__ == "__main__":
    main()
