"""A pretrained text tower from a path: a tiny open_clip model saved in the layouts open_clip and
the Hugging Face hub use, loaded through ``model.text_pretrained``, gives the saved model's text
features; checkpoints that do not fit the config or the tokenizer are refused before loading; a
pretrained tag is refused without a download."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import open_clip
import pytest
import torch

from cliplung.config import ConfigError, preset
from cliplung.model import build_model
from cliplung.model.text_encoder import TextEncoder, text_model_config

PATCH = 16


def _tiny_clip(seed: int = 7) -> open_clip.CLIP:
    torch.manual_seed(seed)
    return open_clip.CLIP(**text_model_config("cliplung-tiny")).eval()


def _texts() -> torch.Tensor:
    return open_clip.tokenize(["the nodule is spiculation.", "malignant.", "a nodule image of benign."])


@pytest.mark.parametrize("layout", ["checkpoint.pt", "state_dict.bin", "hub-safetensors", "hub-bin"])
def test_saved_tiny_tower_loads_with_its_features(tmp_path: Path, layout: str) -> None:
    clip = _tiny_clip()
    state = clip.state_dict()
    if layout == "checkpoint.pt":
        source = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, source)
    elif layout == "state_dict.bin":
        source = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(state, source)
    else:
        source = tmp_path / "snapshot"
        source.mkdir()
        if layout == "hub-safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, source / "open_clip_model.safetensors")
        else:
            torch.save(state, source / "open_clip_pytorch_model.bin")
    loaded = TextEncoder("cliplung-tiny", pretrained=str(source)).eval()
    random = TextEncoder("cliplung-tiny").eval()
    ids = _texts()
    with torch.no_grad():
        expected = clip.encode_text(ids)
        got = loaded.forward_ids(ids, loaded.embed_tokens(ids))
        eot = ids.argmax(dim=1)
        cut = int(eot.max()) + 1
        short = loaded(loaded.embed_tokens(ids[:, :cut]), eot)
        other = random.forward_ids(ids, random.embed_tokens(ids))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(short, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other, expected)  # the weights really changed the features


def test_the_whole_model_starts_from_the_loaded_tower(tmp_path: Path) -> None:
    clip = _tiny_clip()
    path = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), path)
    cfg = dataclasses.replace(preset("debug").model, text_pretrained=str(path))
    model = build_model(cfg, num_classes=3, patch_size=PATCH)
    got = model.text_encoder.tower.state_dict()
    assert torch.equal(got["text_projection"], clip.text_projection.detach())
    assert torch.equal(
        got["transformer.resblocks.1.mlp.c_fc.weight"], clip.transformer.resblocks[1].mlp.c_fc.weight
    )


def _tower(**text_cfg) -> dict[str, torch.Tensor]:
    cfg = {"width": 64, "heads": 2, "layers": 2, "context_length": 77, "vocab_size": 49408, **text_cfg}
    return open_clip.model._build_text_tower(64, cfg).state_dict()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            lambda: _tower(width=32),
            r"token_embedding\.weight is \(49408, 32\), the model needs \(49408, 64\)",
        ),
        (
            lambda: _tower(vocab_size=32000),
            r"token_embedding\.weight is \(32000, 64\).*tokenizer's vocabulary",
        ),
        (
            lambda: _tower(context_length=64),
            r"positional_embedding is \(64, 64\), the model needs \(77, 64\)",
        ),
        (lambda: _tower(layers=3), r"it has 3 transformer layers, the model config 2"),
        (
            lambda: {**_tower(), "text_projection": torch.zeros(64, 32)},
            r"text_projection is \(64, 32\), the model needs \(64, 64\) \(width x embed_dim\)",
        ),
    ],
)
def test_checkpoints_that_do_not_fit_are_refused_naming_what(tmp_path: Path, state, message: str) -> None:
    path = tmp_path / "bad.pt"
    torch.save(state(), path)
    with pytest.raises(
        ConfigError,
        match=rf"^model\.text_pretrained: '.*bad\.pt' does not fit model\.text_model 'cliplung-tiny': {message}",
    ):
        TextEncoder("cliplung-tiny", pretrained=str(path))


def test_nothing_is_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for name in ("create_model", "create_model_and_transforms", "download_pretrained"):
        monkeypatch.setattr(open_clip, name, no_network)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", no_network)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", no_network)
    with pytest.raises(
        ConfigError, match=r"'openai' is an open_clip pretrained tag of 'ViT-B-16'.*downloads nothing"
    ):
        TextEncoder("ViT-B-16", pretrained="openai")
    with pytest.raises(ConfigError, match=r"is neither an existing file nor a directory holding one\.$"):
        TextEncoder("cliplung-tiny", pretrained=str(tmp_path / "missing.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"directory .*empty' holds none of"):
        TextEncoder("cliplung-tiny", pretrained=str(tmp_path / "empty"))
