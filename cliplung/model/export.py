"""Inference export: the image encoder and head alone, with the config that rebuilds them.

An exported model holds no text tower, prompt or token-projection weights, so it has exactly the
parameters of the ``ce`` baseline. The saved payload is ``{"format", "version", "config", "state_dict"}``
with ``config = Config.to_dict()``: :func:`load_inference` rebuilds the model from the file alone
(``torch.load(..., weights_only=True)``, so loading runs no pickled code). This file is the one a
run produces that is meant to be shared; the other files of a run directory (DeepSpeed optimizer
state, Tune's experiment state) are unpickled when a run resumes and must never come from someone
you would not let run code.

The format checks live here and nowhere else: :func:`check_inference_payload` (format tag,
version, stored config) and :func:`load_inference` (file readable, weights fit the model the config
describes) raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cliplung.config import Config, ConfigError, config_from_dict
from cliplung.model.cliplung import CLIPLung, build_classifier
from cliplung.model.errors import CheckpointError
from cliplung.model.image_encoder import NoduleClassifier

__all__ = [
    "FORMAT",
    "CheckpointError",
    "check_inference_payload",
    "export_inference",
    "inference_payload",
    "load_inference",
    "save_inference",
]

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


def check_inference_payload(payload: Any, *, name: str | None = None) -> Config:
    """The config of an inference export, or a :class:`CheckpointError` starting with ``name`` (the
    file; None for an in-memory payload): the payload must be a ``{FORMAT}`` dict of a supported
    version whose stored config is valid."""
    name = f"{name}: " if name else ""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{name}not a {FORMAT} export (expected the model.pt that training writes into every "
            "checkpoint directory)"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{name}{FORMAT} version {payload.get('version')!r} is not supported (expected {VERSION})"
        )
    try:
        config = config_from_dict(payload.get("config") or {})
    except (ConfigError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"{name}the config stored in the checkpoint is invalid: {exc}") from None
    if not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{name}the {FORMAT} export holds no state_dict")
    return config


def _read_payload(path: Path, name: str, map_location: str | torch.device) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{name}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{name}: not a readable checkpoint (truncated, corrupt, or not a weights-only torch file): "
            f"{type(exc).__name__}: {reason}"
        ) from None


def load_inference(
    source: str | Path | dict[str, Any],
    map_location: str | torch.device = "cpu",
    *,
    name: str | None = None,
) -> tuple[NoduleClassifier, Config]:
    """Rebuild the inference model from a saved file (or an in-memory payload) with no other input.

    Every failure is a :class:`CheckpointError` naming the file (``name`` when the file is a local
    copy of a remote one).
    """
    if isinstance(source, dict):
        shown, payload = name, source
    else:
        shown = name or str(source)
        payload = _read_payload(Path(source), shown, map_location)
    config = check_inference_payload(payload, name=shown)
    model = build_classifier(
        config.model, num_classes=config.data.num_classes, patch_size=config.prepare.patch_size
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, ValueError) as exc:  # missing / unexpected keys, shape mismatches
        detail = " ".join(str(exc).split())
        if len(detail) > 400:
            detail = detail[:400] + " ..."
        prefix = f"{shown}: " if shown else ""
        raise CheckpointError(
            f"{prefix}its weights do not fit the model its stored config describes (saved from another "
            f"model configuration?): {detail}"
        ) from None
    return model.to(map_location).eval(), config
