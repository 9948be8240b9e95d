"""CLIP-Lung and its baselines (imports no Ray).

```python
from cliplung.model import build_model, ModelEMA, export_inference, load_inference
model = build_model(cfg.model, num_classes=cfg.data.num_classes, patch_size=cfg.prepare.patch_size)
out = model(images, labels=labels, attributes=attributes)   # logits, loss, parts (ce, ic, ca, ia)
model.predict(images)                                       # image encoder + head only
```
"""

import importlib

# Submodules load on first use (PEP 562): a process that needs one piece (the run layer's
# CheckpointError, the EMA in the training step) does not import the text tower and open_clip.
_HOME = {
    "RATING_RANGES": "attributes",
    "scale_ratings": "attributes",
    "CLIPLung": "cliplung",
    "attribute_weights": "cliplung",
    "build_classifier": "cliplung",
    "build_model": "cliplung",
    "class_names_for": "cliplung",
    "contrastive_losses": "cliplung",
    "ModelEMA": "ema",
    "export_inference": "export",
    "inference_payload": "export",
    "load_inference": "export",
    "save_inference": "export",
    "NoduleClassifier": "image_encoder",
}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = sorted(_HOME)
