"""Offline checks of the KubeRay manifests under k8s/.

No Kubernetes cluster is needed. The kustomizations are rendered with `kustomize` or
`kubectl kustomize` when one is installed, and always with the small renderer below, which
implements exactly the kustomize features k8s/ uses (resources, configMapGenerator, JSON6902
patches, `$patch: delete`, images) and refuses anything else; where both exist their outputs must
agree.

Every RayCluster and RayJob is validated against the v1 `openAPIV3Schema` of the KubeRay CRDs in
shared/kuberay-crds (``../shared`` next to the repository, or ``$CLIPLUNG_SHARED_DIR``), strictly:
Kubernetes silently prunes fields a structural schema does not declare, so an unknown field here is
an error rather than a setting that quietly does nothing. Policy checks follow: token
authentication, no external Services, resources and non-root security contexts on every container,
GPU groups, no literal credentials, and the monitoring wiring.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
BASE = K8S / "base"
CLUSTER_KUSTOMIZATIONS = {
    "base": BASE,
    "cpu-dev": K8S / "overlays" / "cpu-dev",
    "gpu": K8S / "overlays" / "gpu",
}
JOB_KUSTOMIZATIONS = {
    "base/jobs": BASE / "jobs",
    "cpu-dev/jobs": K8S / "overlays" / "cpu-dev" / "jobs",
    "gpu/jobs": K8S / "overlays" / "gpu" / "jobs",
}
KUSTOMIZATIONS = {**CLUSTER_KUSTOMIZATIONS, **JOB_KUSTOMIZATIONS}
DASHBOARD_JSON = BASE / "grafana" / "cliplung-dashboard.json"

RAY_VERSION = "2.60.0"
STORAGE_CONFIGMAP = "cliplung-storage"
CREDENTIALS_SECRET = "cliplung-s3-credentials"
PLACEHOLDER = "REPLACE_ME"

Doc = dict[str, Any]


# --------------------------------------------------------------------------- the renderer


class UnsupportedKustomization(Exception):
    """The kustomization uses a feature this renderer does not implement."""


class PatchTestFailed(Exception):
    """A JSON6902 `test` operation did not hold (kustomize fails the build the same way)."""


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise UnsupportedKustomization(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk_to_parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    node = doc
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, parts[-1]


def apply_json6902(doc: Doc, ops: list[dict[str, Any]]) -> Doc:
    """RFC 6902 add / remove / replace / test: the operations k8s/ uses."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, parts = op["op"], _pointer(op["path"])
        parent, key = _walk_to_parent(doc, parts)
        if kind == "test":
            actual = parent[int(key)] if isinstance(parent, list) else parent.get(key)
            if actual != op["value"]:
                raise PatchTestFailed(f"{op['path']}: expected {op['value']!r}, found {actual!r}")
        elif kind == "remove":
            del parent[int(key) if isinstance(parent, list) else key]
        elif kind == "replace":
            if isinstance(parent, list):
                parent[int(key)] = copy.deepcopy(op["value"])
            else:
                if key not in parent:
                    raise PatchTestFailed(f"replace of missing {op['path']}")
                parent[key] = copy.deepcopy(op["value"])
        elif kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if key == "-" else int(key), copy.deepcopy(op["value"]))
            else:
                parent[key] = copy.deepcopy(op["value"])
        else:
            raise UnsupportedKustomization(f"JSON6902 op {kind!r}")
    return doc


def _target_matches(doc: Doc, target: dict[str, str]) -> bool:
    unsupported = set(target) - {"group", "version", "kind", "name"}
    if unsupported:
        raise UnsupportedKustomization(f"patch target fields {sorted(unsupported)}")
    group, _, version = doc["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}
    return all(wanted[k] == v for k, v in target.items())


def _split_image(image: str) -> tuple[str, str | None]:
    name, sep, tag = image.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return image, None


def _set_images(node: Any, images: list[dict[str, str]]) -> None:
    """kustomize's image transformer: every `image` in any `containers` or `initContainers` list."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name, tag = _split_image(container["image"])
                    for rule in images:
                        if rule["name"] == name:
                            unsupported = set(rule) - {"name", "newName", "newTag"}
                            if unsupported:
                                raise UnsupportedKustomization(f"images fields {sorted(unsupported)}")
                            name = rule.get("newName", name)
                            tag = rule.get("newTag", tag)
                    container["image"] = f"{name}:{tag}" if tag else name
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def _generate_configmap(root: Path, spec: dict[str, Any]) -> Doc:
    unsupported = set(spec) - {"name", "files", "options"}
    options = spec.get("options", {})
    if unsupported or set(options) - {"labels", "disableNameSuffixHash"}:
        raise UnsupportedKustomization(f"configMapGenerator {spec}")
    if not options.get("disableNameSuffixHash"):
        raise UnsupportedKustomization("name suffix hashes are not implemented")
    data = {}
    for entry in spec["files"]:
        key, _, path = entry.rpartition("=") if "=" in entry else (Path(entry).name, "", entry)
        data[key] = (root / path).read_text()
    meta: dict[str, Any] = {"name": spec["name"]}
    if options.get("labels"):
        meta["labels"] = dict(options["labels"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def render(root: Path) -> list[Doc]:
    """Build the kustomization in `root` the way kustomize does for the features k8s/ uses."""
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {
        "apiVersion",
        "kind",
        "resources",
        "configMapGenerator",
        "patches",
        "images",
    }
    if unsupported:
        raise UnsupportedKustomization(f"{root}: {sorted(unsupported)}")
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        path = (root / entry).resolve()
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    docs.extend(_generate_configmap(root, g) for g in kustomization.get("configMapGenerator", []))
    for patch in kustomization.get("patches", []):
        if set(patch) - {"path", "patch", "target"}:
            raise UnsupportedKustomization(f"{root}: patch {patch}")
        ops = yaml.safe_load((root / patch["path"]).read_text() if "path" in patch else patch["patch"])
        if isinstance(ops, dict) and ops.get("$patch") == "delete" and "target" not in patch:
            # The one strategic-merge directive k8s/ uses: drop a resource.
            doomed = (ops["apiVersion"], ops["kind"], ops["metadata"]["name"])
            if doomed not in [_key(d) for d in docs]:
                raise UnsupportedKustomization(f"{root}: $patch: delete of missing {doomed}")
            docs = [d for d in docs if _key(d) != doomed]
            continue
        if not isinstance(ops, list) or "target" not in patch:
            raise UnsupportedKustomization(
                f"{root}: only JSON6902 patches and $patch: delete are implemented"
            )
        matched = [i for i, d in enumerate(docs) if _target_matches(d, patch["target"])]
        if not matched:
            raise UnsupportedKustomization(f"{root}: patch target {patch['target']} matches nothing")
        for i in matched:
            docs[i] = apply_json6902(docs[i], ops)
    if kustomization.get("images"):
        for doc in docs:
            _set_images(doc, kustomization["images"])
    return docs


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _key(doc: Doc) -> tuple[str, str, str]:
    return (doc["apiVersion"], doc["kind"], doc["metadata"]["name"])


class _RenderedOnDemand(dict):
    """kustomization name -> rendered documents, built on first use so that a broken
    kustomization fails the tests that need it rather than the collection of this module."""

    def __missing__(self, name: str) -> list[Doc]:
        self[name] = render(KUSTOMIZATIONS[name])
        return self[name]


RENDERED = _RenderedOnDemand()


# --------------------------------------------------------------------------- walking the manifests


def cluster_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(label, RayClusterSpec) for every RayCluster and every RayJob's own cluster."""
    for doc in docs:
        if doc["kind"] == "RayCluster":
            yield f"RayCluster/{doc['metadata']['name']}", doc["spec"]
        elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
            yield f"RayJob/{doc['metadata']['name']}", doc["spec"]["rayClusterSpec"]


def pod_templates(docs: list[Doc]) -> Iterator[tuple[str, str, Doc]]:
    """(label, role, pod template) for Ray heads, worker groups and RayJob submitters."""
    for label, spec in cluster_specs(docs):
        yield f"{label} head", "head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{label} group {group['groupName']}", "worker", group["template"]
    for doc in docs:
        if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
            yield (
                f"RayJob/{doc['metadata']['name']} submitter",
                "submitter",
                doc["spec"]["submitterPodTemplate"],
            )


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


def all_rendered() -> list[tuple[str, Doc]]:
    return [(name, doc) for name in KUSTOMIZATIONS for doc in RENDERED[name]]


# --------------------------------------------------------------------------- schemas


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


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.protocols.Validator]:
    crd_dir = shared_dir() / "kuberay-crds"
    if not crd_dir.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {crd_dir} (set CLIPLUNG_SHARED_DIR)")
    validators = {}
    for path in sorted(crd_dir.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _strict(v1["schema"]["openAPIV3Schema"])
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    assert {"RayCluster", "RayJob"} <= set(validators), sorted(validators)
    return validators


def schema_errors(validator: jsonschema.protocols.Validator, doc: Doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# --------------------------------------------------------------------------- files and rendering


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


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_renderer_agrees_with_kustomize(name: str) -> None:
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed; the built-in renderer is checked alone")
    out = subprocess.run([*command, str(KUSTOMIZATIONS[name])], capture_output=True, text=True, check=True)
    theirs = {_key(d): d for d in yaml.safe_load_all(out.stdout) if d}
    ours = {_key(d): d for d in RENDERED[name]}
    assert sorted(theirs) == sorted(ours)
    for key, doc in ours.items():
        assert theirs[key] == doc, f"{name}: {key} differs between kustomize and the test renderer"


def test_renderer_refuses_a_failed_patch_test() -> None:
    doc = {"spec": {"workerGroupSpecs": [{"groupName": "cpu"}]}}
    with pytest.raises(PatchTestFailed):
        apply_json6902(doc, [{"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "gpu"}])
    with pytest.raises(UnsupportedKustomization):
        apply_json6902(doc, [{"op": "move", "from": "/spec", "path": "/x"}])
    patched = apply_json6902(
        doc, [{"op": "add", "path": "/spec/workerGroupSpecs/-", "value": {"groupName": "gpu"}}]
    )
    assert [g["groupName"] for g in patched["spec"]["workerGroupSpecs"]] == ["cpu", "gpu"]
    assert doc["spec"]["workerGroupSpecs"] == [{"groupName": "cpu"}], "the input must not be modified"


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
        assert {d["kind"] for d in RENDERED[name]} == {"RayJob"}, name
        # `kubectl apply -k ... -l cliplung.io/job=<job>` picks one job by this label.
        assert sorted(d["metadata"]["labels"]["cliplung.io/job"] for d in jobs) == [
            "prepare",
            "train",
            "tune",
        ]


# --------------------------------------------------------------------------- CRD schemas


def test_ray_resources_validate_against_the_kuberay_crds(crd_validators) -> None:
    checked = 0
    for name, doc in all_rendered():
        if doc["apiVersion"] == "ray.io/v1":
            errors = schema_errors(crd_validators[doc["kind"]], doc)
            assert not errors, f"{name} {_key(doc)}:\n" + "\n".join(errors)
            checked += 1
    assert checked == 3 + 9  # one RayCluster per cluster kustomization, three RayJobs per jobs one


def test_strict_schema_validation_catches_typos(crd_validators) -> None:
    (cluster,) = [d for d in RENDERED["base"] if d["kind"] == "RayCluster"]
    bad = copy.deepcopy(cluster)
    bad["spec"]["authOption"] = bad["spec"].pop("authOptions")  # would be pruned: auth silently off
    assert any("authOption" in e for e in schema_errors(crd_validators["RayCluster"], bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["authOptions"]["mode"] = "tokens"
    assert schema_errors(crd_validators["RayCluster"], bad)
    bad = copy.deepcopy(cluster)
    del bad["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    assert schema_errors(crd_validators["RayCluster"], bad)


# --------------------------------------------------------------------------- KubeRay rules the schema cannot express


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kuberay_validation_rules(name: str) -> None:
    dns1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    for doc in RENDERED[name]:
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        # KubeRay's limits: 53 for a RayCluster (room for "-serve-svc"), 6 fewer for a RayJob.
        limit = {"RayCluster": 53, "RayJob": 47}[doc["kind"]]
        assert dns1035.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= limit, doc[
            "metadata"
        ]
        if doc["kind"] == "RayJob":
            spec = doc["spec"]
            # One of the two ways to get a cluster. clusterSelector plus backoffLimit would be a trap:
            # a retry makes KubeRay delete "its" cluster, which in that mode is the shared one.
            assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec)
            assert "clusterSelector" not in spec or not spec.get("backoffLimit")
            if spec.get("ttlSecondsAfterFinished", 0) > 0:
                assert spec.get("shutdownAfterJobFinishes") is True, "KubeRay rejects a TTL without shutdown"
            assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    for label, spec in cluster_specs(RENDERED[name]):
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for group in groups:
            params = group.get("rayStartParams", {})
            assert "labels" not in params, label
            assert not (
                set(params) & {"num-cpus", "num-gpus", "memory", "resources"} and group.get("resources")
            ), label
        names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
        assert len(names) == len(set(names)), label
        for group in spec.get("workerGroupSpecs", []):
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], (
                label,
                group["groupName"],
            )


# --------------------------------------------------------------------------- security policy


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_token_authentication_is_on_for_every_cluster(name: str) -> None:
    specs = list(cluster_specs(RENDERED[name]))
    assert specs
    for label, spec in specs:
        assert spec.get("authOptions", {}).get("mode") == "token", label
        assert "enableK8sTokenAuth" not in spec["authOptions"], f"{label}: not supported for RayJob"
        major, minor, _ = (int(x) for x in spec["rayVersion"].split("."))
        assert (major, minor) >= (2, 52), f"{label}: token auth needs Ray >= 2.52"
        assert spec["rayVersion"] == RAY_VERSION, label
    # Fail closed: even if an operator ignored authOptions, Ray itself starts in token mode.
    for label, role, container, _ in containers(RENDERED[name]):
        if role != "submitter":
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
    for label, _, container, pod in containers(RENDERED[name]):
        assert not pod.get("hostNetwork"), label
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


def _check_container_security(label: str, security: Doc) -> None:
    assert security.get("allowPrivilegeEscalation") is False, label
    assert "ALL" in security.get("capabilities", {}).get("drop", []), label
    assert not security.get("capabilities", {}).get("add"), label
    assert not security.get("privileged"), label
    assert security.get("runAsNonRoot") is True, label
    assert security.get("runAsUser") == 1000, f"{label}: uid 1000 is `ray` in the Ray images"


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_pod_runs_as_the_non_root_ray_user(name: str) -> None:
    for label, _, template in pod_templates(RENDERED[name]):
        pod_security = template["spec"].get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True, label
        assert pod_security.get("runAsUser") == 1000, label
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", label
    for label, _, container, _ in containers(RENDERED[name]):
        _check_container_security(label, container.get("securityContext", {}))
    for label, spec in cluster_specs(RENDERED[name]):
        _check_container_security(f"{label} autoscaler", spec["autoscalerOptions"].get("securityContext", {}))


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
    for path in K8S.rglob("kustomization.yaml"):
        resources = [str(r) for r in yaml.safe_load(path.read_text()).get("resources", [])]
        assert not any("secret" in r for r in resources), path


# --------------------------------------------------------------------------- storage wiring


def test_storage_settings_come_from_the_configmap_and_the_secret() -> None:
    for name in KUSTOMIZATIONS:
        for label, role, container, _ in containers(RENDERED[name]):
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
    pairs = list(zip(words[2::2], words[3::2], strict=True))
    assert all(flag.startswith("--") for flag, _ in pairs), words
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
def test_jobs_ask_for_what_their_cluster_can_give(name: str) -> None:
    env = {"CLIPLUNG_STORAGE": "s3://b"}
    for job in ("train", "tune"):
        doc = _job(name, job)
        _, flags, overrides = entrypoint_flags(doc["spec"]["entrypoint"], env)
        workers = int(flags.get("--workers", overrides.get("train.workers", 0)))
        gpus = float(flags.get("--gpus-per-worker", overrides.get("train.gpus_per_worker", 0)))
        concurrent = int(overrides.get("tune.max_concurrent", 1))
        assert workers >= 1, (name, job)
        groups = _gpu_groups(doc["spec"]["rayClusterSpec"])
        if name.startswith("cpu-dev"):
            assert gpus == 0 and not groups, (name, job)
            (cpu_group,) = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
            cpus = cpu_group["maxReplicas"] * quantity(
                cpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
            )
            # One CPU per training worker, and one left over for Ray Data.
            assert workers * concurrent + 1 <= cpus, (name, job)
        else:
            (group,) = groups
            per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            assert gpus >= 1, f"{name} {job}: the paper preset trains on CPU unless told otherwise"
            assert workers * gpus * concurrent <= group["maxReplicas"] * per_pod, (name, job)


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
    return {c["image"] for _, _, c, _ in containers(docs)}


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
        for label, _, container, _ in containers(RENDERED[name]):
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
            if role == "submitter":
                continue
            labels = template["metadata"]["labels"]
            # KubeRay adds ray.io/is-ray-node=yes itself; the rest must come from the manifests.
            assert all(labels.get(k) == v for k, v in selector.items() if k != "ray.io/is-ray-node"), label
            named = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
            assert named.get("metrics") == 8080 and named.get("cliplung-metrics") == 9464, label


def test_grafana_dashboard_configmap() -> None:
    (config,) = [
        d
        for d in RENDERED["base"]
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cliplung-grafana-dashboard"
    ]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config["data"]["cliplung-dashboard.json"]) == json.loads(DASHBOARD_JSON.read_text())


def test_grafana_dashboard_panels() -> None:
    dashboard = json.loads(DASHBOARD_JSON.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "cliplung_" in variables["run"]["definition"] and variables["run"]["multi"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
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
