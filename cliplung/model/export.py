"""Inference export: the image encoder and head alone, with the config that rebuilds them.

An exported model holds no text tower, prompt or token-projection weights, so it has exactly the
parameters of the ``ce`` baseline. The saved payload is ``{"format", "version", "config", "state_dict"}``
with ``config = Config.to_dict()``: :func:`load_inference` rebuilds the model from the file alone
(``torch.load(..., weights_only=True)``, so loading runs no pickled code).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cliplung.config import Config, config_from_dict
from cliplung.model.cliplung import CLIPLung, build_classifier
from cliplung.model.image_encoder import NoduleClassifier

__all__ = ["FORMAT", "export_inference", "inference_payload", "load_inference", "save_inference"]

FORMAT = "cliplung-inference"
VERSION = 1


def _unwrap(model: Any) -> nn.Module:
    """The CLIPLung inside a DeepSpeed engine / DDP wrapper / :class:`ModelEMA`."""
    while not isinstance(model, CLIPLung | NoduleClassifier) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, CLIPLung | NoduleClassifier):
        raise TypeError(f"expected a CLIPLung model (or a wrapper of one), got {type(model).__name__}")
    return model


def export_inference(model: Any) -> NoduleClassifier:
    """An fp32, eval-mode copy of the model's image encoder + head (``module(images) -> logits``)."""
    model = _unwrap(model)
    classifier = model.classifier if isinstance(model, CLIPLung) else model
    return copy.deepcopy(classifier).float().eval()


def inference_payload(model: Any, config: Config) -> dict[str, Any]:
    """What :func:`save_inference` writes: format tag, config dict and the inference state dict."""
    state = {k: v.detach().cpu().clone() for k, v in export_inference(model).state_dict().items()}
    return {"format": FORMAT, "version": VERSION, "config": config.public_dict(), "state_dict": state}


def save_inference(model: Any, config: Config, path: str | Path) -> Path:
    """Write :func:`inference_payload` to ``path`` atomically (temporary file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(inference_payload(model, config), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_inference(
    source: str | Path | dict[str, Any], map_location: str | torch.device = "cpu"
) -> tuple[NoduleClassifier, Config]:
    """Rebuild the inference model from a saved file (or an in-memory payload) with no other input."""
    if isinstance(source, dict):
        payload = source
    else:
        payload = torch.load(source, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{source if not isinstance(source, dict) else 'payload'}: not a {FORMAT} file")
    if payload.get("version") != VERSION:
        raise ValueError(f"{FORMAT}: unsupported version {payload.get('version')!r} (expected {VERSION})")
    config = config_from_dict(payload["config"])
    model = build_classifier(
        config.model, num_classes=config.data.num_classes, patch_size=config.prepare.patch_size
    )
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location).eval(), config
