"""``cliplung evaluate`` / ``cv`` / ``compare``: metrics on hand-checked cases, checkpoint choice,
split isolation, reports, bad checkpoints, and the CLI."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_synthetic_store

from cliplung import cli
from cliplung.config import Config, ConfigError, apply_overrides, dump_config, load_config
from cliplung.data.store import StoreError
from cliplung.evaluate import cv as cv_module
from cliplung.evaluate.checkpoints import CheckpointError, load_checkpoint
from cliplung.evaluate.evaluate import evaluate
from cliplung.evaluate.metrics import compute_metrics, expected_calibration_error
from cliplung.evaluate.splits import SplitLeakError, check_split_isolation, fold_rows
from cliplung.model import build_model, save_inference
from cliplung.runs import Run, find_checkpoint
from cliplung.train.metrics import classification_metrics

PATCH = 16

# ------------------------------------------------------------------ helpers and fixtures


class _Arbitrary:
    """A pickled object of this class is code to run: ``weights_only=True`` refuses it."""


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _save(cfg: Config, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes=cfg.data.num_classes, patch_size=cfg.prepare.patch_size)
    return save_inference(model, cfg, path)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("store") / "synthetic")
    make_synthetic_store(path, n_patients=20, patch=PATCH)
    return path


@pytest.fixture(scope="module")
def config(store_path: str) -> Config:
    return load_config("debug", [f"data.store={store_path}"])


def _fake_run(
    storage: Path, cfg: Config, val_scores: list[float], *, extra: dict | None = None, manifest: bool = True
) -> Path:
    """A run directory as training leaves it: config.yaml, splits.json, epoch_NNNN/ checkpoints."""
    from cliplung.data.ingest import compute_splits
    from cliplung.data.store import NoduleStore

    run = storage / cfg.name
    run.mkdir(parents=True, exist_ok=True)
    if manifest:
        store = NoduleStore.open(cfg.data.store)
        run_cfg = apply_overrides(cfg, [f"storage.path={storage}"])
        splits = compute_splits(store, cfg.data).record(cfg.data.store)
        Run.of(run_cfg).start(run_cfg, kind="train", store=store, splits=splits)
    else:
        dump_config(cfg, run / "config.yaml")
    for epoch, score in enumerate(val_scores):
        ckpt = run / f"epoch_{epoch:04d}"
        _save(cfg, ckpt / "model.pt", seed=epoch)
        metrics = {"val/macro_f1": score, **((extra or {}).get(epoch, {}))}
        (ckpt / "train_state.json").write_text(
            json.dumps({"epoch": epoch, "global_step": epoch, "metrics": metrics})
        )
    return run


# ------------------------------------------------------------------ metrics


def test_metrics_of_a_hand_checked_three_class_case() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.55, 0.25, 0.20],  # 0 -> 0, confidence 0.55 (bin 5)
            [0.30, 0.45, 0.25],  # 0 -> 1 wrong, 0.45 (bin 4)
            [0.10, 0.85, 0.05],  # 1 -> 1, 0.85 (bin 8)
            [0.20, 0.75, 0.05],  # 1 -> 1, 0.75 (bin 7)
            [0.05, 0.10, 0.85],  # 2 -> 2, 0.85 (bin 8)
            [0.65, 0.05, 0.30],  # 2 -> 0 wrong, 0.65 (bin 6)
        ]
    )
    m = compute_metrics(labels, probs, ("benign", "unsure", "malignant"))
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    pc = m["per_class"]
    assert [pc[c]["precision"] for c in ("benign", "unsure", "malignant")] == pytest.approx([1 / 2, 2 / 3, 1])
    assert [pc[c]["recall"] for c in ("benign", "unsure", "malignant")] == pytest.approx([1 / 2, 1, 1 / 2])
    assert [pc[c]["f1"] for c in ("benign", "unsure", "malignant")] == pytest.approx([0.5, 0.8, 2 / 3])
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # benign vs rest: positives score 0.55, 0.30; negatives 0.10, 0.20, 0.05, 0.65 -> 6 of 8 pairs.
    assert pc["benign"]["auc"] == pytest.approx(6 / 8)
    # ECE = 1/6 (0.45 + 0.45 + 0.65 + 0.25) + 2/6 * 0.15
    assert m["ece"] == pytest.approx(0.35)
    assert [b["count"] for b in m["reliability"]] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 0]
    # The numbers the validation loop selected checkpoints with agree.
    ref = classification_metrics(labels, probs, ("benign", "unsure", "malignant"))
    assert (m["accuracy"], m["macro_f1"], m["auc"]) == pytest.approx(
        (ref["accuracy"], ref["macro_f1"], ref["auc"])
    )


def test_ece_bins_are_equal_width_and_right_closed() -> None:
    labels = np.array([1, 0, 1, 1])
    # confidences 0.5 (edge: bin (0.25, 0.5]), 0.75 (edge: bin (0.5, 0.75]), 0.9 and 1.0 (last bin)
    probs = np.array([[0.5, 0.5], [0.25, 0.75], [0.1, 0.9], [0.0, 1.0]])
    ece, bins = expected_calibration_error(labels, probs, n_bins=4)
    assert [b["count"] for b in bins] == [0, 1, 1, 2]
    # argmax of a tie is class 0 (wrong); 0.75 -> class 1 (wrong); 0.9, 1.0 right
    assert bins[1]["accuracy"] == 0 and bins[2]["accuracy"] == 0 and bins[3]["accuracy"] == 1
    assert ece == pytest.approx(0.25 * 0.5 + 0.25 * 0.75 + 0.5 * (1 - 0.95))
    assert math.isnan(bins[0]["accuracy"])
    perfect, _ = expected_calibration_error(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert perfect == 0.0


def test_two_class_auc_and_absent_class() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])
    m = compute_metrics(labels, probs, ("benign", "malignant"))
    # malignant scores 0.7, 0.4 vs benign 0.2, 0.6: 3 of 4 pairs ordered right
    assert m["auc"] == pytest.approx(0.75)
    assert m["per_class"]["malignant"]["auc"] == pytest.approx(m["auc"])
    only_benign = compute_metrics(np.array([0, 0]), probs[:2], ("benign", "malignant"))
    assert math.isnan(only_benign["auc"]) and math.isnan(only_benign["per_class"]["malignant"]["auc"])


# ------------------------------------------------------------------ rows, checkpoints


@pytest.mark.parametrize(("task", "fold"), [("3class", 0), ("2class", 0), ("2class", 3)])
def test_fold_rows_are_the_test_split_of_ingest(store_path: str, task: str, fold: int) -> None:
    from cliplung.data.ingest import compute_splits
    from cliplung.data.store import NoduleStore

    store = NoduleStore.open(store_path)
    cfg = load_config("debug", [f"data.task={task}", f"data.test_fold={fold}"])
    rows, labels = fold_rows(store, fold, task)
    np.testing.assert_array_equal(rows, compute_splits(store, cfg.data).test)
    stored = store.read(("label",), indices=rows)["label"]
    expected = (stored == 2).astype(np.int64) if task == "2class" else stored
    np.testing.assert_array_equal(labels, expected)
    assert task == "3class" or 1 not in stored


def test_run_checkpoint_is_selected_on_validation_never_test(tmp_path: Path, config: Config) -> None:
    cfg = apply_overrides(config, ["name=sel"])
    # test/macro_f1 would pick epoch 2; the validation metric picks epoch 1.
    run = _fake_run(tmp_path, cfg, [0.2, 0.7, 0.5], extra={2: {"test/macro_f1": 0.99}}, manifest=False)
    (run / "epoch_0003").mkdir()  # being uploaded: no model.pt yet, never a candidate
    (run / "epoch_0003" / "train_state.json").write_text(
        json.dumps({"epoch": 3, "metrics": {"val/macro_f1": 1.0}})
    )
    choice = find_checkpoint("sel", storage_path=str(tmp_path))
    assert choice.epoch == 1 and choice.model_path.endswith("epoch_0001/model.pt")
    assert choice.metric == "val/macro_f1" and len(choice.candidates) == 3
    assert find_checkpoint(str(run)).epoch == 1  # a run directory works without --storage
    assert find_checkpoint(str(run / "epoch_0002")).epoch is None  # an explicit checkpoint is taken as is

    # A hand-edited run config naming a test metric is refused (the config itself says why).
    text = (
        (run / "config.yaml")
        .read_text()
        .replace("checkpoint_metric: val/macro_f1", "checkpoint_metric: test/macro_f1")
    )
    (run / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match="test/macro_f1"):
        find_checkpoint("sel", storage_path=str(tmp_path))
    with pytest.raises(CheckpointError, match="no such run"):
        find_checkpoint("missing", storage_path=str(tmp_path))


def test_bad_checkpoints_give_errors_naming_the_file(tmp_path: Path, config: Config) -> None:
    good = _save(config, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a readable checkpoint"):
        load_checkpoint(truncated)

    # Weights of a wider encoder under this config: a state-dict mismatch.
    wide = apply_overrides(config, ["model.image_width=16"])
    payload = torch.load(_save(wide, tmp_path / "wide.pt"), weights_only=True)
    payload["config"] = config.to_dict()
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match=r"mismatch\.pt: its weights do not fit"):
        load_checkpoint(tmp_path / "mismatch.pt")

    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: not a cliplung-inference export"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save(
        {"format": "cliplung-inference", "version": 1, "config": {"model": {"n_ctx": 0}}}, tmp_path / "cfg.pt"
    )
    with pytest.raises(CheckpointError, match=r"cfg\.pt: the config stored in the checkpoint is invalid"):
        load_checkpoint(tmp_path / "cfg.pt")

    torch.save({"format": _Arbitrary()}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match=r"pickle\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


# ------------------------------------------------------------------ evaluate


def test_evaluate_writes_metrics_and_a_self_contained_report(
    tmp_path: Path, config: Config, store_path: str
) -> None:
    cfg = apply_overrides(config, ["name=ev"])
    _fake_run(tmp_path / "runs", cfg, [0.1, 0.3])
    out = tmp_path / "report"
    result = evaluate("ev", store_path, storage=str(tmp_path / "runs"), out_dir=out)

    assert result["fold"] == 0 and result["held_out"] is True
    assert result["split_check"]["status"] == "ok" and result["split_check"]["leaks"] == 0
    assert result["selection"]["epoch"] == 1
    assert result["n"] == 8 == sum(sum(r) for r in result["confusion_matrix"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy"] == result["accuracy"] and 0 <= saved["ece"] <= 1
    assert set(saved["per_class"]) == {"benign", "unsure", "malignant"}
    assert len((out / "predictions.csv").read_text().strip().splitlines()) == 1 + 8
    for name in ("confusion_matrix", "roc", "reliability", "attention"):
        width, height = _png_size(out / f"{name}.png")
        assert width >= 200 and height >= 200 and (out / f"{name}.png").stat().st_size > 5000
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and 'src="http' not in html
    assert "Grad-CAM" in html and "in-plane" in html
    assert len(saved["attention"]["nodules"]) == 8  # up to 3 per class; fold 0 has 3, 3, 2

    # Another fold was training data for this model: allowed, flagged.
    other = evaluate(tmp_path / "runs" / "ev" / "epoch_0000", store_path, fold=1, out_dir=tmp_path / "f1")
    assert other["held_out"] is False and other["split_check"]["status"] == "not held out"


def test_evaluate_refuses_a_leaky_run_and_a_store_of_another_patch_size(
    tmp_path: Path, config: Config
) -> None:
    from cliplung.data.store import NoduleStore

    cfg = apply_overrides(config, ["name=leak"])
    run = _fake_run(tmp_path / "runs", cfg, [0.5])
    splits = json.loads((run / "splits.json").read_text())
    splits["train_rows"].append(splits["test_rows"][0])
    (run / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(SplitLeakError, match="in fold 0, the test fold, but in the run's train_rows"):
        evaluate("leak", cfg.data.store, storage=str(tmp_path / "runs"), out_dir=tmp_path / "o")
    store = NoduleStore.open(cfg.data.store)
    test_patient = store.read(("patient_id",), indices=splits["test_rows"][:1])["patient_id"][0]
    splits["train_rows"].pop()
    same_patient_elsewhere = {
        "train_rows": [],
        "val_rows": [],
        "test_rows": [],
        "test_patients": [test_patient],
    }
    assert check_split_isolation(same_patient_elsewhere, store, 0)["leaks"] == 0
    with pytest.raises(SplitLeakError, match="not in fold 1"):
        check_split_isolation(same_patient_elsewhere, store, 1)

    big = str(tmp_path / "big")
    make_synthetic_store(big, n_patients=10, patch=20)
    with pytest.raises(StoreError, match=r"holds 20\^3 patches but checkpoint .* trained on 16\^3"):
        evaluate(run / "epoch_0000", big, out_dir=tmp_path / "o2")


# ------------------------------------------------------------------ cross-validation


def _history(values: list[float]) -> dict:
    return {"epoch": list(range(len(values))), "val/macro_f1": values, "val/auc": values}


def test_cross_validation_table_with_stand_in_training(
    tmp_path: Path, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cv's orchestration, ablation configs, isolation proof, tables, paired statistics and
    learning curves, with ``train`` replaced by a stand-in that leaves what a real run leaves
    (the real one is exercised by the slow tests below)."""
    trained: list[Config] = []

    def fake_train(cfg: Config, address=None, shared_data=None):
        assert shared_data is None
        trained.append(cfg)
        run = _fake_run(Path(cfg.storage.path), cfg, [0.4, 0.6, 0.5])
        state = json.loads((run / "epoch_0002" / "train_state.json").read_text())
        state["early_stopping"] = {"stopped": cfg.model.method == "ce", "history": _history([0.4, 0.6, 0.5])}
        (run / "epoch_0002" / "train_state.json").write_text(json.dumps(state))

    monkeypatch.setattr(cv_module, "_train", fake_train)
    monkeypatch.setattr(cv_module, "_shared_data", lambda *a: None)
    cfg = apply_overrides(config, [f"storage.path={tmp_path / 'runs'}", "name=cmp"])
    methods = ["ce", "cliplung-no-ic", "cliplung-rating"]
    table = cv_module.compare(cfg, 2, methods, out_dir=tmp_path / "cmp")
    assert [(c.name, c.data.test_fold) for c in trained] == [
        (f"cmp-{m}-fold{k}", k) for m in methods for k in (0, 1)
    ]
    by_name = {c.name: c.model for c in trained}
    assert by_name["cmp-ce-fold0"].method == "ce"
    assert (
        by_name["cmp-cliplung-no-ic-fold1"].lambda_ic == 0
        and by_name["cmp-cliplung-no-ic-fold1"].lambda_ia == 1
    )
    assert by_name["cmp-cliplung-rating-fold0"].attribute_prompts == "rating"
    published = cv_module.fold_config(cfg, 0, "cliplung", tag_method=True)
    assert published.name == "cmp-cliplung-fold0" and published.model.method == "cliplung"
    assert published.model.attribute_prompts == "name" and published.model.lambda_ca == 0.5
    assert all(r["isolation"]["leaks"] == 0 and r["epoch"] == 1 for r in table.rows)
    assert all(r["epochs_trained"] == 3 and r["stopped_early"] == (r["method"] == "ce") for r in table.rows)
    summary = table.summary()
    accs = [r["accuracy"] for r in table.rows if r["method"] == "ce"]
    assert summary["ce"]["accuracy"][:2] == pytest.approx((np.mean(accs), np.std(accs, ddof=1)))
    assert {"recall_benign", "recall_unsure", "f1_unsure"} <= set(table.metrics)

    paired = table.paired()
    assert set(paired) == {"cliplung-no-ic", "cliplung-rating"}
    for results in paired.values():
        assert [r.metric for r in results] == ["macro_f1", "auc", "f1_unsure"]
        for r in results:  # the per-fold differences are those of the table's rows
            method = next(m for m, res in paired.items() if res is results)
            rows = {x["fold"]: x for x in table.rows if x["method"] == method}
            base = {x["fold"]: x for x in table.rows if x["method"] == "ce"}
            assert r.differences == pytest.approx([rows[k][r.metric] - base[k][r.metric] for k in (0, 1)])
            assert r.ci_low <= r.mean <= r.ci_high or math.isnan(r.mean)
    assert table.curves()["ce"] == [[0.4, 0.6, 0.5], [0.4, 0.6, 0.5]]

    out = tmp_path / "cmp"
    md = (out / "compare_summary.md").read_text()
    assert "| ce |" in md and "±" in md and "Setting `3class`" in md
    assert "Paired difference, method − ce" in md and "95 % paired bootstrap CI" in md
    assert "| ce | 3* (2) | 3* (2) |" in md and "| cliplung-rating | 3 (2) | 3 (2) |" in md
    for name in ("compare_summary.csv", "compare_folds.csv", "compare_paired.csv", "compare_curves.json"):
        assert (out / name).is_file(), name
    assert not (out / "cv_summary.md").exists()
    for name in ("compare_summary.png", "compare_paired.png", "compare_curves.png"):
        assert _png_size(out / name)[0] > 200, name
    folds_csv = (out / "compare_folds.csv").read_text().splitlines()
    assert folds_csv[0].startswith("method,fold,run,checkpoint,epoch,epochs_trained,stopped_early,n,accuracy")
    assert len(folds_csv) == 1 + 6
    assert (out / "cmp-ce-fold1" / "report.html").is_file()

    with pytest.raises(ConfigError, match=r"has folds 0\.\.4"):
        cv_module.cross_validate(cfg, [7])
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['clip'\]"):
        cv_module.compare(cfg, 2, ["ce", "clip"], out_dir=tmp_path / "x")

    def leaky_train(cfg: Config, address=None, shared_data=None):
        run = _fake_run(Path(cfg.storage.path), cfg, [0.5])
        splits = json.loads((run / "splits.json").read_text())
        splits["val_rows"].append(splits["test_rows"][-1])
        (run / "splits.json").write_text(json.dumps(splits))

    monkeypatch.setattr(cv_module, "_train", leaky_train)
    with pytest.raises(SplitLeakError, match="val_rows"):
        cv_module.cross_validate(apply_overrides(cfg, ["name=leaky"]), [1], out_dir=tmp_path / "leaky")


def test_methods_names_and_all() -> None:
    assert cv_module.resolve_methods("all") == list(cv_module.VARIANTS)
    assert len(cv_module.VARIANTS) == 8
    assert cv_module.resolve_methods(" ce , cliplung-no-ia ") == ["ce", "cliplung-no-ia"]
    with pytest.raises(ConfigError, match="named twice"):
        cv_module.resolve_methods("ce,ce")
    with pytest.raises(ConfigError, match="at least one"):
        cv_module.resolve_methods(",")


@pytest.mark.slow
def test_cross_validation_trains_and_never_sees_the_test_fold(tmp_path: Path, store_path: str) -> None:
    """Real training (debug preset, one epoch, one worker) of two folds."""
    from cliplung.data.store import NoduleStore

    cfg = load_config(
        "debug",
        [
            f"data.store={store_path}",
            f"storage.path={tmp_path / 'runs'}",
            "name=cvslow",
            "train.epochs=1",
            "train.workers=1",
            "metrics.enabled=false",
        ],
    )
    table = cv_module.cross_validate(cfg, [0, 1], out_dir=tmp_path / "cv")
    store = NoduleStore.open(store_path)
    folds = store.read(("fold",))["fold"]
    patients = store.read(("patient_id",))["patient_id"]
    for row in table.rows:
        k = row["fold"]
        splits = json.loads((tmp_path / "runs" / f"cvslow-fold{k}" / "splits.json").read_text())
        seen = np.array(splits["train_rows"] + splits["val_rows"])
        assert not (folds[seen] == k).any()
        assert not set(patients[seen]) & set(splits["test_patients"])
        assert set(splits["test_patients"]) == set(patients[folds == k])
        assert math.isfinite(row["accuracy"])
    assert (tmp_path / "cv" / "cv_summary.md").is_file()


# ------------------------------------------------------------------ CLI


def _cli(argv: list[str]) -> int:
    return cli.main(argv)


def test_cli_exit_codes(tmp_path: Path, config: Config, store_path: str, capsys) -> None:
    ckpt = _save(config, tmp_path / "ck" / "model.pt")
    assert (
        _cli(["evaluate", "--checkpoint", str(ckpt), "--data", store_path, "--out", str(tmp_path / "r")]) == 0
    )
    assert json.loads(capsys.readouterr().out.split("\nreport:")[0])["n"] == 8
    bad = tmp_path / "bad.pt"
    bad.write_bytes(ckpt.read_bytes()[:100])
    assert (
        _cli(["evaluate", "--checkpoint", str(bad), "--data", store_path, "--out", str(tmp_path / "r2")]) == 2
    )
    assert "bad.pt: not a readable checkpoint" in capsys.readouterr().err
    assert _cli(["predict", "--checkpoint", str(ckpt), "--data", store_path]) == 2
    assert _cli(["predict", "--checkpoint", str(ckpt), "--dicom-dir", str(tmp_path)]) == 2
    assert (
        _cli(
            ["predict", "--checkpoint", str(ckpt), "--dicom-dir", str(tmp_path), "--center", "-1", "2", "-3"]
        )
        == 2
    )
    assert "no DICOM" in capsys.readouterr().err
    assert _cli(["cv", "--data", store_path, "--folds", "9", "--storage", str(tmp_path / "runs")]) == 2
    assert "has folds 0..4" in capsys.readouterr().err


# ------------------------------------------------------------------ Grad-CAM


@pytest.mark.parametrize("encoder", ["resnet18_2d", "resnet18_3d"])
def test_grad_cam_matches_a_by_hand_computation(config: Config, encoder: str) -> None:
    import torch.nn.functional as F

    from cliplung.evaluate.attention import axial_cams, grad_cam
    from cliplung.model import build_classifier

    cfg = apply_overrides(config, [f"model.image_encoder={encoder}"])
    torch.manual_seed(0)
    model = build_classifier(cfg.model, num_classes=3, patch_size=PATCH).train()
    images = torch.rand(3, PATCH, PATCH, PATCH)
    cams, targets = grad_cam(model, images)
    assert model.training and all(p.grad is None for p in model.parameters())

    model.eval()
    enc = model.encoder
    x = images if enc.dims == 2 else images.unsqueeze(1)
    maps = enc.layer4(enc.layer3(enc.layer2(enc.layer1(F.relu(enc.bn1(enc.conv1(x)))))))
    maps = maps.detach().requires_grad_(True)
    rest = maps.reshape(maps.shape[0], *enc._reshaped) if enc.dims == 2 else maps
    logits = model.head(enc.pool(enc.conv1x1(rest)))
    np.testing.assert_array_equal(targets, logits.argmax(1).numpy())
    for i in range(3):
        (g,) = torch.autograd.grad(logits[i, targets[i]], maps, retain_graph=True)
        dims = tuple(range(1, maps.ndim - 1))
        cam = F.relu((g[i].mean(dim=dims, keepdim=True) * maps[i]).sum(0)).detach()
        mode = "bilinear" if enc.dims == 2 else "trilinear"
        size = (PATCH,) * (2 if enc.dims == 2 else 3)
        cam = F.interpolate(cam[None, None], size=size, mode=mode, align_corners=False)[0, 0]
        expected = (cam / cam.max()).numpy() if cam.max() > 0 else np.zeros(size)
        np.testing.assert_allclose(cams[i], expected, atol=1e-5)
    assert cams.shape == ((3, PATCH, PATCH) if encoder == "resnet18_2d" else (3, PATCH, PATCH, PATCH))
    assert axial_cams(cams).shape == (3, PATCH, PATCH) and cams.min() >= 0 and cams.max() <= 1


def test_evaluate_two_class_drops_unsure_nodules(tmp_path: Path, config: Config, store_path: str) -> None:
    cfg = apply_overrides(config, ["data.task=2class", "data.test_fold=2"])
    ckpt = _save(cfg, tmp_path / "two" / "model.pt")
    result = evaluate(ckpt, store_path, out_dir=tmp_path / "r")
    from cliplung.data.store import NoduleStore

    rows, _ = fold_rows(NoduleStore.open(store_path), 2, "3class")
    assert result["fold"] == 2 and result["class_names"] == ["benign", "malignant"]
    assert 0 < result["n"] < len(rows) and len(result["confusion_matrix"]) == 2
    assert _png_size(tmp_path / "r" / "roc.png")[0] > 200


# ------------------------------------------------------------------ packed, shared runs


@pytest.mark.slow
def test_shared_split_data_is_what_each_run_would_read(synthetic_store, ray_session) -> None:
    import ray

    from cliplung.data.ingest import build_data_plan, open_training_store
    from cliplung.data.shared import SharedSplitData

    cfg = load_config(
        "debug", [f"data.store={synthetic_store.path}", "data.unsure_range=[2.5, 3.5]", "data.ingest=memory"]
    )
    store, splits = open_training_store(cfg)
    shared = SharedSplitData(cfg, store, splits)
    own = build_data_plan(cfg, store, splits)
    cut = build_data_plan(cfg, store, splits, shared=shared)
    for rank in range(cfg.train.workers):
        for a, b in zip(ray.get(list(own.refs[rank])), ray.get(list(cut.refs[rank])), strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    rows = np.concatenate([ray.get(cut.refs[r][1])["index"] for r in range(cfg.train.workers)])
    assert rows.tolist() == list(splits.val)  # every validation row, once, in order
    other = apply_overrides(cfg, ["data.test_fold=1"])
    _, other_splits = open_training_store(other)
    with pytest.raises(ValueError, match="another split"):
        build_data_plan(other, store, other_splits, shared=shared)
    with pytest.raises(ValueError, match="another split"):
        shared.arrays_for(apply_overrides(cfg, ["data.unsure_range=[3, 3]"]), splits)


@pytest.mark.slow
def test_compare_packs_one_worker_runs_with_early_stopping(
    tmp_path: Path, store_path: str, ray_session
) -> None:
    """Real training: 2 folds x 2 methods, 1-worker runs two at a time on one Ray cluster, each
    fold's data read once, early stopping; the table has its epochs, curves and paired rows."""
    cfg = load_config(
        "debug",
        [
            f"data.store={store_path}",
            f"storage.path={tmp_path / 'runs'}",
            "name=pack",
            "train.epochs=3",
            "train.workers=1",
            "train.early_stopping.patience=1",
            "train.early_stopping.min_delta=1.0",
            "metrics.enabled=false",
        ],
    )
    table = cv_module.compare(
        cfg, [0, 1], ["ce", "cliplung-no-ca"], out_dir=tmp_path / "out", parallel=2, address=ray_session
    )
    assert len(table.rows) == 4
    assert all(r["epochs_trained"] == 2 and r["stopped_early"] for r in table.rows)
    assert all(len(c) == 2 for runs in table.curves().values() for c in runs)
    [results] = table.paired().values()
    assert all(len(r.differences) == 2 for r in results)
    md = (tmp_path / "out" / "compare_summary.md").read_text()
    assert re.search(r"\| cliplung-no-ca \| 2\* \([12]\) \| 2\* \([12]\) \|", md), md
    assert _png_size(tmp_path / "out" / "compare_curves.png")[0] > 200


# ------------------------------------------------------------------ pictures and flags


def test_attention_overlay_keeps_the_ct_readable() -> None:
    from matplotlib import colormaps

    from cliplung.evaluate.report import ATTENTION_CMAP, ATTENTION_MAX_ALPHA, _overlay

    cam = np.array([[0.0, 0.25], [0.5, 1.0]])
    rgba = _overlay(cam)
    assert ATTENTION_CMAP in ("inferno", "magma", "viridis", "plasma", "cividis")  # perceptually uniform
    np.testing.assert_allclose(rgba[..., 3], ATTENTION_MAX_ALPHA * cam)  # no map: fully transparent
    np.testing.assert_allclose(rgba[1, 1, :3], colormaps[ATTENTION_CMAP](1.0)[:3])
    assert ATTENTION_MAX_ALPHA < 1


def test_attention_figure_shows_the_plain_slice_beside_the_overlay(monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.axes import Axes

    from cliplung.evaluate import report

    shown: list[tuple[str, object]] = []
    original = Axes.imshow

    def spy(self, data, *args, **kwargs):
        shown.append((kwargs.get("cmap"), np.asarray(data).shape))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(Axes, "imshow", spy)
    slices = np.random.default_rng(0).random((2, 16, 16))
    cams = np.zeros((2, 16, 16))
    cams[:, 4:8, 4:8] = 1.0
    png = report.attention_figure(
        slices, cams, ["a", "b"], [0, 2], ("benign", "unsure", "malignant"), window="HU"
    )
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # Per nodule: the grey slice twice (plain, under the map) and one RGBA overlay, never "jet".
    assert [c for c, _ in shown] == ["gray", "gray", None] * 2
    assert [s for _, s in shown][2] == (16, 16, 4)


def test_montage_title_names_the_store_not_its_path(tmp_path: Path, store_path: str, monkeypatch) -> None:
    from matplotlib.figure import Figure

    from cliplung.data.inspect import inspect_store

    titles: list[str] = []
    original = Figure.suptitle

    def spy(self, text, *args, **kwargs):
        titles.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Figure, "suptitle", spy)
    inspect_store(store_path, png_out=str(tmp_path / "m.png"))
    assert titles == ["synthetic (synthetic)"] and str(tmp_path) not in titles[0]


def test_cv_flags_setting_early_stopping_methods(
    tmp_path: Path, store_path: str, capsys, monkeypatch
) -> None:
    seen = {}

    def fake_compare(config, folds, methods, **kwargs):
        seen.update(config=config, folds=folds, methods=methods, parallel=kwargs["parallel"])
        return cv_module.CVTable(rows=[], metrics=())

    monkeypatch.setattr(cv_module, "compare", fake_compare)
    base = ["compare", "--data", store_path, "--storage", str(tmp_path / "r"), "--out", str(tmp_path / "o")]
    argv = [*base, "--setting", "band-3class-test2", "--early-stopping", "4,0.005", "--methods", "all"]
    assert _cli([*argv, "--workers", "1", "--parallel", "3", "--epochs", "30"]) == 0
    cfg = seen["config"]
    assert cfg.data.unsure_range == (2.5, 3.5) and (cfg.data.task, cfg.data.test_task) == ("3class", "2class")
    assert (cfg.train.early_stopping.patience, cfg.train.early_stopping.min_delta) == (4, 0.005)
    assert cfg.train.workers == 1 and cfg.train.epochs == 30 and seen["parallel"] == 3
    assert seen["methods"] == list(cv_module.VARIANTS)
    capsys.readouterr()
    assert _cli([*base, "--methods", "ce,bogus"]) == 2
    assert "unknown method(s) ['bogus']" in capsys.readouterr().err
    for bad in (["--early-stopping", "0"], ["--early-stopping", "3,x"], ["--setting", "4class"]):
        with pytest.raises(SystemExit) as exc:
            _cli([*base, *bad])
        assert exc.value.code == 2
