"""``cliplung bench gpu --dry-run``: the GPU check runs its code at tiny sizes on the CPU."""

from __future__ import annotations

import json

import pytest
from torch_threads import one_torch_thread  # noqa: F401 - autouse fixture

from cliplung import cli
from cliplung.bench import GPU_SECTIONS, gpu


def test_gpu_bench_dry_run_runs_every_section(capsys) -> None:
    # data_path starts Ray: test_gpu_bench_dry_run_data_path (slow) runs it through the CLI.
    assert gpu.main(["--dry-run", "--json", "--skip", "data_path"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["dry_run"] is True and report["device"].startswith("cpu")
    assert report["data_path"] == {"skipped": "asked to (--skip)"}
    for section in ("train_step", "text_path", "sync_debug", "predict"):
        assert section in report and "error" not in report[section], report.get(section)
    step = report["train_step"]
    assert step["precision"] == "bf16" and step["optimizer"] == "AdamW" and step["loss_finite"]
    assert step["samples_per_s"] > 0 and step["gflop_per_step"] > 0
    assert step["host_syncs_per_step"] == 0, step["host_sync_sites"]
    assert {name: v["syncs"] for name, v in report["sync_debug"].items() if v["syncs"]} == {}
    assert len(report["sync_debug"]) >= 10
    assert report["text_path"]["train_flop_ratio"] > 1
    assert report["predict"]["probabilities_finite"] and report["predict"]["patches_per_s"] > 0


@pytest.mark.slow
def test_gpu_bench_dry_run_data_path(ray_session, capsys) -> None:
    # The other sections: test_gpu_bench_dry_run_runs_every_section (they ran here twice before).
    others = [a for name in GPU_SECTIONS if name != "data_path" for a in ("--skip", name)]
    assert cli.main(["bench", "gpu", "--dry-run", "--json", *others]) == cli.EXIT_OK
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["predict"] == {"skipped": "asked to (--skip)"}
    data = report["data_path"]
    with capsys.disabled():
        print(f"\ndata_path: {json.dumps(data)}")
    assert "error" not in data, data
    assert data["null_model_samples_per_s"] > 0 and 0 <= data["null_model_data_wait_share"] <= 1
    # The paired in-worker ceiling ran beside the path (what bench ingest judges its target on).
    assert data["in_memory_reference_samples_per_s"] > 0 and data["null_model_over_in_memory_reference"] > 0
    assert data["tune_one_trial"]["trials"] == 1 and data["tune_two_packed_trials"]["trials"] == 2
    assert all(r > 0 for r in data["tune_two_packed_trials"]["samples_per_s_each"])
