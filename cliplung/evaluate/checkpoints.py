"""Loading a trained model for evaluation and prediction: only ever its inference export.

Which checkpoint a command means is the run layer's business (:func:`cliplung.runs.find_checkpoint`:
a ``model.pt``, a checkpoint directory, a run directory, or a run name with its storage, whose best
checkpoint by the run's *validation* metric is chosen). This module loads the chosen ``model.pt``
(image encoder + head, no text tower) with ``torch.load(weights_only=True)``, so no pickled code
runs, and turns every way a file can be wrong into a :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from cliplung import storage as storage_lib
from cliplung.config import Config, ConfigError, config_from_dict
from cliplung.model.export import FORMAT, load_inference
from cliplung.model.image_encoder import NoduleClassifier
from cliplung.runs import MODEL_FILE, CheckpointChoice, CheckpointError, find_checkpoint

__all__ = ["CheckpointChoice", "CheckpointError", "load_checkpoint", "open_checkpoint"]


def load_checkpoint(path: str | Path, *, name: str | None = None) -> tuple[NoduleClassifier, Config]:
    """The inference model and its config from a ``model.pt`` (or the checkpoint dir holding one).

    Every failure is a :class:`CheckpointError` naming the file (``name`` when the file is a local
    copy of a remote one).
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    shown = name or str(path)
    if not path.is_file():
        raise CheckpointError(f"{shown}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{shown}: not a readable checkpoint (truncated, corrupt, or not a weights-only torch file): "
            f"{type(exc).__name__}: {reason}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{shown}: not a {FORMAT} export (expected the model.pt that training writes into every "
            "checkpoint directory)"
        )
    try:
        config_from_dict(payload.get("config") or {})
    except (ConfigError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{shown}: the config stored in the checkpoint is invalid: {exc}") from None
    try:
        model, config = load_inference(payload)
    except RuntimeError as exc:  # load_state_dict: missing / unexpected keys, shape mismatches
        detail = " ".join(str(exc).split())
        if len(detail) > 400:
            detail = detail[:400] + " ..."
        raise CheckpointError(
            f"{shown}: its weights do not fit the model its stored config describes (saved from another "
            f"model configuration?): {detail}"
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"{shown}: {exc}") from None
    return model, config


def open_checkpoint(
    checkpoint_or_run: str | Path, *, storage: str | None = None, endpoint: str | None = None
) -> tuple[NoduleClassifier, Config, CheckpointChoice]:
    """:func:`cliplung.runs.find_checkpoint`, then :func:`load_checkpoint` (an ``s3://`` file
    through a temporary local copy)."""
    choice = find_checkpoint(str(checkpoint_or_run), storage_path=storage, endpoint=endpoint)
    if not storage_lib.is_s3(choice.model_path):
        model, config = load_checkpoint(choice.model_path)
        return model, config, choice
    fs = storage_lib.fsspec_filesystem(choice.model_path, endpoint)
    with tempfile.TemporaryDirectory(prefix="cliplung-ckpt-") as tmp:
        local = Path(tmp) / MODEL_FILE
        fs.get(storage_lib.parse_location(choice.model_path).path, str(local))
        model, config = load_checkpoint(local, name=choice.model_path)
    return model, config, choice
