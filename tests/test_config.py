"""The typed configuration: presets, overrides, YAML/JSON files, dump/load, and every validation error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from cliplung.config import (
    CLASS_NAMES_2,
    CLASS_NAMES_3,
    Config,
    ConfigError,
    PrepareConfig,
    SearchSpace,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    preset,
)
from cliplung.train.metrics import (
    LOSS_PARTS,
    TRAIN_STATS,
    classification_metric_names,
    classification_metrics,
    reported_metrics,
)

# --------------------------------------------------------------------------- presets


def test_presets_build_and_differ_where_documented() -> None:
    debug, paper = preset("debug"), preset("paper")
    assert debug.preset == "debug" and debug.name == "debug"
    assert paper.preset == "paper" and paper.name == "paper"
    assert (debug.prepare.patch_size, paper.prepare.patch_size) == (16, 32)
    assert (debug.model.text_model, paper.model.text_model) == ("cliplung-tiny", "ViT-B-16")
    assert (debug.train.epochs, paper.train.epochs) == (2, 100)
    assert paper.train.optimizer == "sgd" and paper.train.lr == 1e-3 and paper.train.momentum == 0.9
    assert paper.train.batch_size == 32 and paper.train.ema_decay == 0.999
    assert load_config() == debug  # the default source is the debug preset
    assert load_config("paper") == paper
    assert preset("debug") is not preset("debug")  # a fresh tree each time


def test_unknown_preset() -> None:
    with pytest.raises(
        ConfigError, match=r"^preset: unknown preset 'large'; choose from \['debug', 'paper'\]$"
    ):
        preset("large")


# --------------------------------------------------------------------------- overrides


def test_overrides_parse_values_as_yaml() -> None:
    cfg = load_config(
        "debug",
        [
            "model.n_ctx=8",
            "model.feature_channels=32",
            "train.precision=bf16",
            "train.lr=1e-2",
            "prepare.hu_window=[-1200, 600]",
            "train.augment.flip=false",
            "tune.space.n_ctx=[1, 2]",
            "prepare.limit=null",
            "model.ctx_init=a scan of",
        ],
    )
    assert cfg.model.n_ctx == 8 and cfg.train.precision == "bf16" and cfg.train.lr == 0.01
    assert cfg.prepare.hu_window == (-1200.0, 600.0) and isinstance(cfg.prepare.hu_window[0], float)
    assert cfg.train.augment.flip is False and cfg.tune.space.n_ctx == (1, 2)
    assert cfg.prepare.limit is None and cfg.model.ctx_init == "a scan of"


def test_later_overrides_win_and_apply_overrides_returns_a_new_config() -> None:
    base = preset("debug")
    cfg = apply_overrides(base, ["train.epochs=3", "train.epochs=5"])
    assert cfg.train.epochs == 5 and base.train.epochs == 2
    # No value is ever evaluated as code: a string stays a string.
    assert apply_overrides(base, ["model.ctx_init=__import__('os').getcwd()"]).model.ctx_init.startswith(
        "__import__"
    )


# --------------------------------------------------------------------------- files


def test_yaml_file_starts_from_its_preset_and_takes_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("preset: debug\nname: exp\ntrain:\n  epochs: 7\n  augment:\n    max_shift: 1\n")
    cfg = load_config(path, ["train.lr=0.5"])
    debug = preset("debug")
    assert cfg.name == "exp" and cfg.preset == "debug"
    assert cfg.train.epochs == 7 and cfg.train.augment.max_shift == 1 and cfg.train.lr == 0.5
    assert (
        cfg.model == debug.model and cfg.train.optimizer == debug.train.optimizer
    )  # the rest is the preset's
    # Without a preset a file starts from the defaults.
    bare = tmp_path / "bare.yaml"
    bare.write_text("data:\n  task: 2class\n")
    assert load_config(bare).data.class_names == CLASS_NAMES_2
    assert load_config(bare).model == Config().model


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"preset": "paper", "data": {"test_fold": 2}}))
    cfg = load_config(path)
    assert cfg.preset == "paper" and cfg.data.test_fold == 2 and cfg.data.class_names == CLASS_NAMES_3


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_dump_and_load_round_trip(tmp_path: Path, suffix: str) -> None:
    cfg = apply_overrides(preset("debug"), ["prepare.hu_window=[-900, 300]", "tune.study_db=sqlite:///x.db"])
    path = tmp_path / "sub" / f"config{suffix}"
    text = dump_config(cfg, path)
    assert path.read_text() == text
    if suffix == ".json":
        json.loads(text)
    else:
        assert yaml.safe_load(text) == cfg.to_dict()
    assert load_config(path) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert dump_config(load_config(path)) == dump_config(cfg)


# --------------------------------------------------------------------------- validation errors

ERRORS = [
    # (overrides on the debug preset, the whole message: it starts with the dotted field)
    # prepare
    ("prepare.source=ct", r"prepare.source: must be one of \['phantom', 'lidc'\], got 'ct'"),
    ("prepare.on_error=ignore", r"prepare.on_error: must be one of \['skip', 'fail'\], got 'ignore'"),
    (
        "prepare.patch_size=4",
        r"prepare.patch_size: must be in \[8, 256\] \(256\^3 voxels per patch .*\), got 4",
    ),
    ("prepare.patch_size=512", r"prepare.patch_size: must be in \[8, 256\] .*, got 512"),
    ("prepare.patch_size=16.0", r"prepare.patch_size: must be an integer, got 16.0"),
    ("prepare.patch_size=true", r"prepare.patch_size: must be an integer, got True"),
    ("prepare.spacing_mm=0", r"prepare.spacing_mm: must be > 0, got 0.0"),
    ("prepare.spacing_mm=-1", r"prepare.spacing_mm: must be > 0, got -1.0"),
    ("prepare.spacing_mm=.inf", r"prepare.spacing_mm: must be a finite number, got inf"),
    ("prepare.spacing_mm=.nan", r"prepare.spacing_mm: must be a finite number, got nan"),
    ("prepare.spacing_mm=yes", r"prepare.spacing_mm: must be a number, got True"),
    (
        "prepare.hu_window=[400, -1000]",
        r"prepare.hu_window: must be \(low, high\) with low < high, got \(400.0, -1000.0\)",
    ),
    ("prepare.hu_window=[-1000, .inf]", r"prepare.hu_window: must be a finite number, got inf"),
    ("prepare.hu_window=[-1000]", r"prepare.hu_window: must have 2 items, got \[-1000\]"),
    ("prepare.hu_window=-1000", r"prepare.hu_window: must be a list, got -1000"),
    (
        "prepare.min_readers=0",
        r"prepare.min_readers: must be in \[1, 4\] \(LIDC-IDRI nodules have at most 4 readers\), got 0",
    ),
    ("prepare.min_readers=5", r"prepare.min_readers: must be in \[1, 4\] .*, got 5"),
    ("prepare.folds=1", r"prepare.folds: must be in \[2, 127\] \(the store keeps folds as int8\), got 1"),
    ("prepare.folds=128", r"prepare.folds: must be in \[2, 127\] \(the store keeps folds as int8\), got 128"),
    ("prepare.seed=-1", r"prepare.seed: must be in \[0, 4294967295\] \(a 32-bit seed\), got -1"),
    (
        "prepare.seed=4294967296",
        r"prepare.seed: must be in \[0, 4294967295\] \(a 32-bit seed\), got 4294967296",
    ),
    ("prepare.limit=0", r"prepare.limit: must be > 0, got 0"),
    ("prepare.limit=many", r"prepare.limit: invalid value 'many'"),
    ("prepare.workers=0", r"prepare.workers: must be > 0, got 0"),
    (
        "prepare.workers=9223372036854775808",
        r"prepare.workers: must be in \[-9223372036854775808, 9223372036854775807\], got 9223372036854775808",
    ),
    # data
    ("data.task=4class", r"data.task: must be one of \['3class', '2class'\], got '4class'"),
    ("data.test_fold=-1", r"data.test_fold: must be in \[0, 126\] \(folds are int8\), got -1"),
    ("data.test_fold=127", r"data.test_fold: must be in \[0, 126\] \(folds are int8\), got 127"),
    ("data.val_fraction=0", r"data.val_fraction: must be in \(0, 1\), got 0.0"),
    ("data.val_fraction=1", r"data.val_fraction: must be in \(0, 1\), got 1.0"),
    ("data.val_fraction=.nan", r"data.val_fraction: must be a finite number, got nan"),
    ("data.split_seed=-3", r"data.split_seed: must be in \[0, 4294967295\] \(a 32-bit seed\), got -3"),
    ("data.store=7", r"data.store: must be a string, got 7"),
    # train.augment
    ("train.augment.max_shift=-1", r"train.augment.max_shift: must be >= 0, got -1"),
    ("train.augment.intensity_jitter=-0.1", r"train.augment.intensity_jitter: must be >= 0, got -0.1"),
    (
        "train.augment.intensity_jitter=-.inf",
        r"train.augment.intensity_jitter: must be a finite number, got -inf",
    ),
    ("train.augment.flip=1", r"train.augment.flip: must be true or false, got 1"),
    ("train.augment=3", r"train.augment: must be a mapping, got 3"),
    ("train.augment.rotate=true", r"train.augment.rotate: no such config field"),
    # model
    ("model.method=clip", r"model.method: must be one of \['ce', 'coop', 'cocoop', 'cliplung'\], got 'clip'"),
    (
        "model.image_encoder=vit",
        r"model.image_encoder: must be one of \['resnet18_2d', 'resnet18_3d'\], got 'vit'",
    ),
    (
        "model.attribute_prompts=score",
        r"model.attribute_prompts: must be one of \['name', 'rating'\], got 'score'",
    ),
    ("model.image_width=0", r"model.image_width: must be > 0, got 0"),
    ("model.feature_channels=-16", r"model.feature_channels: must be > 0, got -16"),
    ("model.n_ctx=0", r"model.n_ctx: must be > 0, got 0"),
    ("model.meta_hidden=0", r"model.meta_hidden: must be > 0, got 0"),
    (
        "model.n_ctx=3",
        r"model.n_ctx: must divide model.feature_channels=16 \(one channel group per context token\), got 3",
    ),
    ("model.lambda_ic=-1", r"model.lambda_ic: must be >= 0, got -1.0"),
    ("model.lambda_ia=.inf", r"model.lambda_ia: must be a finite number, got inf"),
    ("model.logit_scale_init=.inf", r"model.logit_scale_init: must be a finite number, got inf"),
    ("model.text_trainable=maybe", r"model.text_trainable: must be true or false, got 'maybe'"),
    # train
    ("train.optimizer=lamb", r"train.optimizer: must be one of \['sgd', 'adamw'\], got 'lamb'"),
    ("train.zero_stage=3", r"train.zero_stage: must be one of \[0, 1, 2\], got 3"),
    ("train.zero_stage=true", r"train.zero_stage: must be one of \[0, 1, 2\], got True"),
    ("train.zero_stage=false", r"train.zero_stage: must be one of \[0, 1, 2\], got False"),
    ("train.precision=fp16", r"train.precision: must be one of \['auto', 'fp32', 'bf16'\], got 'fp16'"),
    ("train.checkpoint_mode=best", r"train.checkpoint_mode: must be one of \['max', 'min'\], got 'best'"),
    ("train.workers=0", r"train.workers: must be > 0, got 0"),
    ("train.cpus_per_worker=0", r"train.cpus_per_worker: must be > 0, got 0"),
    ("train.epochs=0", r"train.epochs: must be > 0, got 0"),
    ("train.batch_size=0", r"train.batch_size: must be > 0, got 0"),
    ("train.grad_accum=0", r"train.grad_accum: must be > 0, got 0"),
    ("train.keep_checkpoints=0", r"train.keep_checkpoints: must be > 0, got 0"),
    ("train.lr=0", r"train.lr: must be > 0, got 0.0"),
    ("train.lr=.inf", r"train.lr: must be a finite number, got inf"),
    ("train.lr=1e400", r"train.lr: must be a finite number, got inf"),
    ("train.weight_decay=-1e-4", r"train.weight_decay: must be >= 0, got -0.0001"),
    ("train.momentum=-0.9", r"train.momentum: must be >= 0, got -0.9"),
    ("train.warmup_epochs=-1", r"train.warmup_epochs: must be >= 0, got -1"),
    ("train.grad_clip=-1", r"train.grad_clip: must be >= 0, got -1.0"),
    ("train.gpus_per_worker=-1", r"train.gpus_per_worker: must be >= 0, got -1.0"),
    ("train.gpus_per_worker=.inf", r"train.gpus_per_worker: must be a finite number, got inf"),
    ("train.max_failures=-1", r"train.max_failures: must be >= 0, got -1"),
    ("train.ema_decay=1", r"train.ema_decay: must be in \[0, 1\), got 1.0"),
    ("train.ema_decay=-0.5", r"train.ema_decay: must be in \[0, 1\), got -0.5"),
    ("train.seed=-1", r"train.seed: must be in \[0, 4294967295\] \(a 32-bit seed\), got -1"),
    (
        "train.batch_size=15",
        r"train.batch_size: must be a multiple of train.workers x train.grad_accum = 2, got 15",
    ),
    (
        "train.checkpoint_metric=val/f1",
        r"train.checkpoint_metric: 'val/f1' is not a metric training reports for data.task='3class' and model.method='cliplung'; choose one of epoch, epochs_done, global_step, train/loss, .*, val/macro_f1, .*val/auc",
    ),
    (
        "train.checkpoint_metric=test/macro_f1",
        r"train.checkpoint_metric: 'test/macro_f1' is not a metric training reports",
    ),
    # tune
    ("tune.mode=best", r"tune.mode: must be one of \['max', 'min'\], got 'best'"),
    ("tune.trials=0", r"tune.trials: must be > 0, got 0"),
    ("tune.max_concurrent=0", r"tune.max_concurrent: must be > 0, got 0"),
    ("tune.grace_period=0", r"tune.grace_period: must be > 0, got 0"),
    ("tune.reduction_factor=1", r"tune.reduction_factor: must be >= 2, got 1"),
    ("tune.seed=-1", r"tune.seed: must be in \[0, 4294967295\] \(a 32-bit seed\), got -1"),
    ("tune.asha=2", r"tune.asha: must be true or false, got 2"),
    ("tune.metric=auc", r"tune.metric: 'auc' is not a metric training reports for data.task='3class'"),
    ("tune.space.n_ctx=[]", r"tune.space.n_ctx: must list at least one prompt length"),
    ("tune.space.n_ctx=[0, 2]", r"tune.space.n_ctx: values must be integers >= 1, got 0"),
    ("tune.space.n_ctx=[true]", r"tune.space.n_ctx: must be an integer, got True"),
    (
        "tune.space.lambda_ic=[2, 1]",
        r"tune.space.lambda_ic: must be \(low, high\) with 0 <= low <= high, got \(2.0, 1.0\)",
    ),
    (
        "tune.space.lambda_ca=[-1, 1]",
        r"tune.space.lambda_ca: must be \(low, high\) with 0 <= low <= high, got \(-1.0, 1.0\)",
    ),
    ("tune.space.lambda_ia=[0, .inf]", r"tune.space.lambda_ia: must be a finite number, got inf"),
    ("tune.space.lr=[0, 0.1]", r"tune.space.lr: log-uniform bounds must be > 0, got \(0.0, 0.1\)"),
    (
        "tune.space.weight_decay=[0, 1e-3]",
        r"tune.space.weight_decay: log-uniform bounds must be > 0, got \(0.0, 0.001\)",
    ),
    ("tune.space=[1]", r"tune.space: must be a mapping, got \[1\]"),
    # metrics
    ("metrics.port=65536", r"metrics.port: must be in \[0, 65535\] \(a TCP port\), got 65536"),
    ("metrics.port=-1", r"metrics.port: must be in \[0, 65535\] \(a TCP port\), got -1"),
    ("metrics.port=true", r"metrics.port: must be an integer, got True"),
    ("metrics.enabled=2", r"metrics.enabled: must be true or false, got 2"),
    # the run name and the override syntax itself
    ("name=a/b", r"name: must be a non-empty name without '/', got 'a/b'"),
    ("name=.hidden", r"name: must be a non-empty name without '/', got '.hidden'"),
    ("name=", r"name: must be a non-empty name without '/', got ''"),
    ('name="a\\0b"', r"name: must be printable and at most 255 bytes as UTF-8, got 'a\\x00b'"),
    (f"name={'n' * 256}", r"name: must be printable and at most 255 bytes as UTF-8, got 'nnn"),
    ("preset=large", r"preset: must be one of \['debug', 'paper'\] or null, got 'large'"),
    ("model.n_ctx", r"override 'model.n_ctx': expected section.field=value"),
    ("modell.n_ctx=4", r"modell: no such config section \(in override 'modell.n_ctx=4'\)"),
    ("model.nctx=4", r"model.nctx: no such config field \(in override 'model.nctx=4'\)"),
    ("model.n_ctx.x=4", r"model.n_ctx: no such config section \(in override 'model.n_ctx.x=4'\)"),
]


@pytest.mark.parametrize(("override", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_every_validation_error_names_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}") as info:
        load_config("debug", [override])
    field = re.split(r"[=:]", override, maxsplit=1)[0]
    assert str(info.value).startswith((f"{field}:", "override ", field.split(".")[0]))


def test_metric_names_depend_on_method_and_task() -> None:
    # The ce baseline has no contrastive losses; the 2-class task has no unsure class.
    with pytest.raises(
        ConfigError, match=r"^train.checkpoint_metric: 'train/ic' is not a metric .* model.method='ce'"
    ):
        load_config("debug", ["model.method=ce", "train.checkpoint_metric=train/ic"])
    assert load_config("debug", ["train.checkpoint_metric=train/ic"]).train.checkpoint_metric == "train/ic"
    with pytest.raises(
        ConfigError, match=r"^tune.metric: 'val/recall_unsure' is not a metric .*data.task='2class'"
    ):
        load_config("debug", ["data.task=2class", "tune.metric=val/recall_unsure"])
    cfg = load_config("debug", ["data.task=2class", "tune.metric=val/recall_malignant", "tune.mode=max"])
    assert cfg.tune.metric == "val/recall_malignant"


def test_method_ce_needs_its_loss() -> None:
    with pytest.raises(
        ConfigError, match=r"^model.lambda_ce: must be > 0 for method 'ce' \(it is the only loss\)$"
    ):
        load_config("debug", ["model.method=ce", "model.lambda_ce=0"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: [1, 2", r"config: .*bad.yaml: not valid YAML/JSON"),
        ("- 1\n- 2\n", r"config: .*bad.yaml: must hold a mapping, got list"),
        ("trian:\n  epochs: 2\n", r"trian: no such config field"),
        ("train:\n  epoch: 2\n", r"train.epoch: no such config field"),
        ("preset: huge\n", r"preset: unknown preset 'huge'"),
        ("preset: [debug]\n", r"preset: must be a preset name, got \['debug'\] \(in .*bad.yaml\)"),
        ("train:\n  zero_stage: true\n", r"train.zero_stage: must be one of \[0, 1, 2\], got True"),
        ("prepare:\n  hu_window: [-1000, .inf]\n", r"prepare.hu_window: must be a finite number, got inf"),
    ],
)
def test_file_errors_name_the_file_or_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config(path)


def test_a_binary_file_is_not_a_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"^config: .*bad.yaml: not valid YAML/JSON"):
        load_config(path)


def test_json_dump_keeps_any_name(tmp_path: Path) -> None:
    # json.dumps escapes U+1F600 as a surrogate pair, which YAML would read back as two characters.
    cfg = apply_overrides(preset("debug"), ["name=run-\U0001f600"])
    dump_config(cfg, tmp_path / "c.json")
    assert load_config(tmp_path / "c.json").name == "run-\U0001f600"


def test_missing_source() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^config: 'nowhere.yaml' is neither a preset \(\['debug', 'paper'\]\) nor a readable file$",
    ):
        load_config("nowhere.yaml")


def test_sections_validate_when_built_directly() -> None:
    with pytest.raises(ConfigError, match=r"^prepare.hu_window: must be a finite number, got inf$"):
        PrepareConfig(hu_window=(-1000.0, float("inf")))
    with pytest.raises(ConfigError, match=r"^train.zero_stage: must be a number, not a boolean, got True$"):
        TrainConfig(zero_stage=True)
    with pytest.raises(ConfigError, match=r"^tune.space.lr: must be a finite number, got nan$"):
        SearchSpace(lr=(float("nan"), 1e-2))
    with pytest.raises(ConfigError, match=r"^metrics.port: must be in \[0, 65535\]"):
        Config(metrics={"port": 99999})


def test_a_stored_config_is_revalidated() -> None:
    data = preset("debug").to_dict()
    data["train"]["zero_stage"] = True
    with pytest.raises(ConfigError, match=r"^train.zero_stage: must be one of \[0, 1, 2\], got True$"):
        config_from_dict(data)


# --------------------------------------------------------------------------- the metric names


@pytest.mark.parametrize("class_names", [CLASS_NAMES_3, CLASS_NAMES_2])
def test_metric_names_match_what_classification_metrics_returns(class_names) -> None:
    import numpy as np

    n = len(class_names)
    labels = np.arange(2 * n) % n
    probs = np.eye(n)[labels] * 0.8 + 0.2 / n
    got = classification_metrics(labels, probs, class_names, prefix="val/")
    assert tuple(got) == tuple(f"val/{m}" for m in classification_metric_names(class_names))


@pytest.mark.parametrize("method", ["ce", "cliplung"])
def test_loss_parts_match_the_model(method: str) -> None:
    import torch

    from cliplung.model import build_model

    cfg = apply_overrides(preset("debug"), [f"model.method={method}"])
    model = build_model(cfg.model, num_classes=3, patch_size=cfg.prepare.patch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a debug model gains nothing from threads on a shared machine
    try:
        out = model(
            torch.rand(2, 16, 16, 16), labels=torch.tensor([0, 2]), attributes=torch.full((2, 8), 3.0)
        )
    finally:
        torch.set_num_threads(threads)
    expected = LOSS_PARTS["ce" if method == "ce" else "contrastive"]
    assert ("loss", *out["parts"]) == expected


def test_train_stats_match_the_loop_report() -> None:
    # The loop's report is the source of truth at run time; this keeps the names in step with it.
    import cliplung.train.loop as loop

    source = Path(loop.__file__).read_text()
    literal = set(re.findall(r'"train/(\w+)"', source)) - {"loss"}
    assert literal == set(TRAIN_STATS)
    names = reported_metrics(CLASS_NAMES_3, "cliplung")
    assert {"epoch", "global_step", "val/macro_f1", "train/loss", "train/ia"} <= set(names)
    assert len(names) == len(set(names))
