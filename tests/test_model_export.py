"""Inference export (no text weights), checkpoint round trip, EMA maths."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch_threads import one_torch_thread  # noqa: F401 - autouse fixture

from cliplung.config import Config, preset
from cliplung.model import ModelEMA, build_model, export_inference, load_inference, save_inference
from cliplung.model.export import inference_payload

PATCH = 16


def _config(**model_changes) -> Config:
    cfg = preset("debug")
    return cfg.replace(model=dataclasses.replace(cfg.model, **model_changes))


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("method", ["coop", "cocoop", "cliplung"])
def test_export_has_exactly_the_parameters_of_ce(method: str) -> None:
    # n_ctx=16 gives a token projection (group dim 16 != 64): it must not be exported either.
    cfg = _config(method=method, n_ctx=16)
    model = build_model(cfg.model, num_classes=3, patch_size=PATCH)
    ce = build_model(_config(method="ce", n_ctx=16).model, num_classes=3, patch_size=PATCH)
    exported = export_inference(model)
    assert _count(exported) == _count(ce) < _count(model)
    assert set(exported.state_dict()) == {k.removeprefix("classifier.") for k in ce.state_dict()}
    assert not any(k.startswith(("text", "prompts", "image_tokens", "logit")) for k in exported.state_dict())
    images = torch.rand(3, PATCH, PATCH, PATCH)
    model.eval()
    torch.testing.assert_close(exported(images), model.predict(images))


def test_saved_inference_weights_rebuild_the_model_from_the_file_alone(tmp_path: Path) -> None:
    cfg = _config(image_encoder="resnet18_3d")
    model = build_model(cfg.model, num_classes=cfg.data.num_classes, patch_size=cfg.prepare.patch_size)
    images = torch.rand(2, PATCH, PATCH, PATCH)
    model(images, labels=torch.tensor([0, 2]), attributes=torch.full((2, 8), 2.0))  # moves BN stats
    model.eval()
    path = save_inference(model, cfg, tmp_path / "export" / "model.pt")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    rebuilt, rebuilt_cfg = load_inference(path)  # torch.load(weights_only=True) inside
    assert rebuilt_cfg == cfg
    torch.testing.assert_close(rebuilt(images), model.predict(images))
    raw = torch.load(path, weights_only=True)
    assert raw["config"] == cfg.to_dict()
    with pytest.raises(ValueError, match="not a cliplung-inference"):
        load_inference({"format": "other"})


def test_export_through_wrappers() -> None:
    cfg = _config()
    model = build_model(cfg.model, num_classes=3, patch_size=PATCH)
    ema = ModelEMA(model, decay=0.5)

    class Engine(torch.nn.Module):  # stands in for a DeepSpeed engine / DDP: exposes .module
        def __init__(self, module: torch.nn.Module):
            super().__init__()
            self.module = module

    assert _count(export_inference(Engine(model))) == _count(export_inference(ema))
    payload = inference_payload(ema, cfg)
    assert load_inference(payload)[1] == cfg


def test_ema_update_maths() -> None:
    torch.manual_seed(0)
    model = build_model(_config(method="ce").model, num_classes=3, patch_size=PATCH)
    ema = ModelEMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.rand(4, PATCH, PATCH, PATCH))  # train mode: BatchNorm running stats change
    ema.update(model)
    after = ema.module.state_dict()
    current = model.state_dict()
    for name, _ in model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * current[name]
        torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6)
    bn = "classifier.encoder.bn1.running_mean"
    assert torch.equal(after[bn], current[bn])  # buffers are copied
    assert ema.updates == 1
    assert all(not p.requires_grad for p in ema.module.parameters())

    clone = ModelEMA(model, decay=0.5)
    clone.load_state_dict(ema.state_dict())
    assert clone.decay == 0.9 and clone.updates == 1
    for k, v in ema.module.state_dict().items():
        assert torch.equal(clone.module.state_dict()[k], v)


def test_ema_keeps_an_fp32_shadow_of_a_bf16_model() -> None:
    model = build_model(_config(method="ce").model, num_classes=3, patch_size=PATCH)
    ema = ModelEMA(model, decay=0.999)
    model = model.to(torch.bfloat16)
    ema.update(model)
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    with pytest.raises(ValueError, match="ema_decay"):
        ModelEMA(model, decay=1.0)


def test_fp32_ema_predicts_on_bf16_patches() -> None:
    # The training loop feeds the EMA copy (fp32) patches in the engine's dtype (bf16 on GPU).
    model = build_model(_config().model, num_classes=3, patch_size=PATCH)
    ema = ModelEMA(model, decay=0.9)
    logits = ema.module.predict(torch.rand(2, PATCH, PATCH, PATCH, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32 and logits.shape == (2, 3)
