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

from cliplung import storage as storage_lib
from cliplung.config import Config
from cliplung.model.export import CheckpointError, load_inference
from cliplung.model.image_encoder import NoduleClassifier
from cliplung.runs import MODEL_FILE, CheckpointChoice, find_checkpoint

__all__ = ["CheckpointChoice", "CheckpointError", "load_checkpoint", "open_checkpoint"]


def load_checkpoint(path: str | Path, *, name: str | None = None) -> tuple[NoduleClassifier, Config]:
    """The inference model and its config from a ``model.pt`` (or the checkpoint dir holding one);
    every failure is a :class:`CheckpointError` naming the file (``name`` when the file is a local
    copy of a remote one), raised by :func:`cliplung.model.export.load_inference`."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    return load_inference(path, name=name)


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
