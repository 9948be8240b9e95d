"""CLIP-Lung and its baselines (imports no Ray).

```python
from cliplung.model import build_model, ModelEMA, export_inference, load_inference
model = build_model(cfg.model, num_classes=cfg.data.num_classes, patch_size=cfg.prepare.patch_size)
out = model(images, labels=labels, attributes=attributes)   # logits, loss, parts (ce, ic, ca, ia)
model.predict(images)                                       # image encoder + head only
```
"""

from cliplung.model.attributes import RATING_RANGES, scale_ratings
from cliplung.model.cliplung import (
    CLIPLung,
    attribute_weights,
    build_classifier,
    build_model,
    class_names_for,
    contrastive_losses,
)
from cliplung.model.ema import ModelEMA
from cliplung.model.export import export_inference, inference_payload, load_inference, save_inference
from cliplung.model.image_encoder import NoduleClassifier

__all__ = [
    "RATING_RANGES",
    "CLIPLung",
    "ModelEMA",
    "NoduleClassifier",
    "attribute_weights",
    "build_classifier",
    "build_model",
    "class_names_for",
    "contrastive_losses",
    "export_inference",
    "inference_payload",
    "load_inference",
    "save_inference",
    "scale_ratings",
]
