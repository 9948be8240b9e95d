"""Text path: batched == per-sample reference, pretrained text weights from a local file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import open_clip
import pytest
import torch
from torch_threads import one_torch_thread  # noqa: F401 - autouse fixture

from cliplung.config import ATTRIBUTES, ConfigError, ModelConfig, preset
from cliplung.model import build_model
from cliplung.model.attributes import RATING_RANGES
from cliplung.model.reference import reference_forward
from cliplung.model.text_encoder import TextEncoder, text_model_config

PATCH = 16


def debug_model_config(**changes) -> ModelConfig:
    return dataclasses.replace(preset("debug").model, **changes)


def batch(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([RATING_RANGES[a][0] for a in ATTRIBUTES], dtype=torch.float)
    hi = torch.tensor([RATING_RANGES[a][1] for a in ATTRIBUTES], dtype=torch.float)
    images = torch.rand(b, PATCH, PATCH, PATCH, generator=g)
    return images, torch.arange(b) % 3, lo + (hi - lo) * torch.rand(b, 8, generator=g)


def _grads(model, loss) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize(
    ("method", "attribute_prompts"),
    [("cliplung", "name"), ("cliplung", "rating"), ("cocoop", "name"), ("coop", "rating"), ("ce", "name")],
)
def test_batched_text_path_equals_per_sample_reference(method: str, attribute_prompts: str) -> None:
    torch.manual_seed(0)
    model = build_model(
        debug_model_config(method=method, attribute_prompts=attribute_prompts),
        num_classes=3,
        patch_size=PATCH,
    ).eval()  # eval: BatchNorm uses running stats, so per-sample and batched image passes agree exactly
    images, labels, attributes = batch(5)
    out = model(images, labels=labels, attributes=attributes)
    ref = reference_forward(model, images, labels, attributes)
    for name in out["parts"]:
        assert abs(out["parts"][name].item() - ref[name].item()) < 1e-5, name
    assert abs(out["loss"].item() - ref["loss"].item()) < 1e-5
    fast, slow = _grads(model, out["loss"]), _grads(model, ref["loss"])
    scale = max(g.abs().max().item() for g in slow)
    worst = max((a - b).abs().max().item() for a, b in zip(fast, slow, strict=True))
    assert worst <= 1e-5 * max(scale, 1.0), (worst, scale)  # fp32: relative to the largest gradient


def test_batched_text_path_is_exact_in_float64() -> None:
    torch.manual_seed(0)
    model = build_model(debug_model_config(), num_classes=3, patch_size=PATCH).double().eval()
    images, labels, attributes = batch(3)
    out = model(images.double(), labels=labels, attributes=attributes)
    ref = reference_forward(model, images.double(), labels, attributes)
    assert abs(out["loss"].item() - ref["loss"].item()) < 1e-10
    for a, b in zip(_grads(model, out["loss"]), _grads(model, ref["loss"]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_text_encoder_matches_open_clip_on_ids() -> None:
    text = TextEncoder("cliplung-tiny")
    ids = open_clip.tokenize(["the nodule is round.", "malignant."])
    expected = text.tower(ids)
    got = text.forward_ids(ids, text.embed_tokens(ids))
    torch.testing.assert_close(got, expected)
    eot = ids.argmax(1)
    cut = int(eot.max()) + 1
    torch.testing.assert_close(text(text.embed_tokens(ids[:, :cut]), eot), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attribute_prompts", ["name", "rating"])
def test_packed_prompt_tree_equals_each_prompt_run_alone(attribute_prompts: str) -> None:
    torch.manual_seed(0)
    model = build_model(
        debug_model_config(attribute_prompts=attribute_prompts, n_ctx=2), num_classes=3, patch_size=PATCH
    ).double()
    prompts, text = model.prompts, model.text_encoder
    c, k, r = prompts.num_classes, 8, prompts.n_levels
    ctx = torch.randn(2, 2, text.width, dtype=torch.double)
    levels = (
        torch.randint(0, r, (2, k)) if attribute_prompts == "rating" else torch.zeros(2, k, dtype=torch.long)
    )
    select = torch.cat([torch.arange(c).expand(2, c), c + torch.arange(k) * r + levels], dim=1)
    packed = text.forward_packed(*prompts.pack(ctx, select, text))
    all_ids = torch.cat([prompts.class_ids, prompts.attr_ids.flatten(0, 1)])
    all_eot = torch.cat([prompts.class_eot, prompts.attr_eot.flatten()])
    for g in range(2):
        ids, eot = all_ids[select[g]], all_eot[select[g]]
        alone = text(prompts.insert_context(text.embed_tokens(ids), ctx[g]), eot)
        torch.testing.assert_close(packed[g], alone, rtol=1e-10, atol=1e-10)
    x, *_ = prompts.pack(ctx, select, text)
    assert x.shape[1] < select.shape[1] * all_ids.shape[1]  # shared words run once, no padding


def _tiny_open_clip() -> open_clip.CLIP:
    torch.manual_seed(123)
    return open_clip.CLIP(**text_model_config("cliplung-tiny"))


@pytest.mark.parametrize(
    "layout", ["open_clip_state_dict", "checkpoint_with_module_prefix", "text_tower_only"]
)
def test_pretrained_text_weights_from_a_local_file(tmp_path: Path, layout: str) -> None:
    clip = _tiny_open_clip()
    state = clip.state_dict()
    if layout == "checkpoint_with_module_prefix":
        state = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    elif layout == "text_tower_only":
        state = TextEncoder("cliplung-tiny").tower.state_dict()
    path = tmp_path / "tiny.pt"
    torch.save(state, path)
    model = build_model(debug_model_config(text_pretrained=str(path)), num_classes=3, patch_size=PATCH)
    tower = model.text_encoder.tower
    if layout == "text_tower_only":
        expected = {k: v for k, v in state.items()}
    else:
        expected = {
            "token_embedding.weight": clip.token_embedding.weight,
            "positional_embedding": clip.positional_embedding,
            "text_projection": clip.text_projection,
            **{f"ln_final.{k}": v for k, v in clip.ln_final.state_dict().items()},
            **{f"transformer.{k}": v for k, v in clip.transformer.state_dict().items()},
        }
    got = tower.state_dict()
    assert set(expected) == set(got)
    for key, value in expected.items():
        assert torch.equal(got[key], value.detach()), key
    # The context vectors start from the loaded embeddings of "a nodule image of".
    assert torch.equal(model.prompts.ctx.detach()[0], expected["token_embedding.weight"].detach()[320])


def test_pretrained_file_without_text_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vision_only.pt"
    torch.save({f"visual.{k}": v for k, v in _tiny_open_clip().visual.state_dict().items()}, path)
    with pytest.raises(ConfigError, match=r"^model\.text_pretrained: .*no text-tower weights"):
        build_model(debug_model_config(text_pretrained=str(path)), num_classes=3, patch_size=PATCH)


def test_pretrained_shape_mismatch_and_unknown_source_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "vitb.pt"
    wide = open_clip.model._build_text_tower(32, {"width": 32, "heads": 2, "layers": 1})
    torch.save(wide.state_dict(), path)
    with pytest.raises((ConfigError, RuntimeError), match="text"):
        build_model(debug_model_config(text_pretrained=str(path)), num_classes=3, patch_size=PATCH)
    with pytest.raises(ConfigError, match=r"^model\.text_pretrained: .*neither an existing file"):
        build_model(debug_model_config(text_pretrained="/no/such/file.pt"), num_classes=3, patch_size=PATCH)


def test_paper_preset_uses_a_trainable_vit_b_16_text_tower() -> None:
    cfg = preset("paper").model
    assert cfg.text_model == "ViT-B-16" and cfg.text_trainable and cfg.method == "cliplung"
    text_cfg = text_model_config("ViT-B-16")["text_cfg"]
    assert text_cfg["width"] == 512 and text_cfg["layers"] == 12
    tiny = text_model_config(preset("debug").model.text_model)
    assert tiny["text_cfg"]["layers"] <= 2 and tiny["embed_dim"] == 64


def test_debug_model_replace_keeps_validation() -> None:
    with pytest.raises(ConfigError, match=r"^model\.n_ctx"):
        dataclasses.replace(preset("debug").model, n_ctx=0)
