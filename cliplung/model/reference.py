"""The per-sample, full-length formulation of CLIP-Lung's losses: a test and benchmark reference only.

This is the published code's shape (a Python loop over the batch, the text tower run on each
sample's class prompts and attribute prompts at the full 77-token context, open_clip's argmax
pooling) with the maths of :mod:`cliplung.model.cliplung` (own-label IC, contrastive IA). Training
uses :meth:`CLIPLung.forward`; tests assert both give the same losses and gradients, and
``cliplung bench model`` times both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliplung.model.attributes import rating_levels
from cliplung.model.cliplung import CLIPLung, attribute_weights

__all__ = ["reference_forward"]


def reference_forward(
    model: CLIPLung, images: torch.Tensor, labels: torch.Tensor, attributes: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``{"loss", "ce", "ic", "ca", "ia"}`` computed one sample (and one token) at a time."""
    cfg = model.config
    encoder = model.classifier.encoder
    fmap = encoder(images)
    logits = model.classifier.logits_from(fmap)
    ce = F.cross_entropy(logits, labels)
    if model.method == "ce":
        return {"loss": cfg.lambda_ce * ce, "ce": ce}
    prompts, text = model.prompts, model.text_encoder
    tokens = model.image_tokens(fmap)
    ctx_all = prompts.contexts(tokens)
    s = model.logit_scale[0].exp()
    b, n, _ = tokens.shape
    k = prompts.attr_ids.shape[0]
    full = text.context_length
    device = tokens.device
    weights = attribute_weights(attributes, cfg.attribute_prompts, model.rating_bounds)
    if cfg.attribute_prompts == "rating":
        levels = rating_levels(attributes, model.rating_bounds)
    else:
        levels = torch.zeros(b, k, dtype=torch.long, device=device)
    attribute_index = torch.arange(k, device=device)
    sample_index = torch.arange(b, device=device)  # cross-entropy targets, on the logits' device

    def encode(ids: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        ids = F.pad(ids, (0, full - ids.shape[-1]))  # back to 77 positions, zero padded
        embeddings = prompts.insert_context(text.embed_tokens(ids), ctx)
        return F.normalize(text.forward_ids(ids, embeddings), dim=-1)

    ic_sum = ca_sum = 0.0
    descriptions = []
    for i in range(b):
        ctx = ctx_all[i if ctx_all.shape[0] > 1 else 0]
        class_features = encode(prompts.class_ids, ctx)  # (C, E)
        attr_ids = prompts.attr_ids[attribute_index, levels[i]]  # (K, L), indexed on the device
        attr_features = encode(attr_ids, ctx)  # (K, E)
        for j in range(n):
            ic_sum = ic_sum + F.cross_entropy((s * class_features @ tokens[i, j])[None], labels[i : i + 1])
        ca_logits = sum(weights[i, a] * (class_features @ attr_features[a]) for a in range(k)) * s / k
        ca_sum = ca_sum + F.cross_entropy(ca_logits[None], labels[i : i + 1])
        descriptions.append(F.normalize(sum(weights[i, a] * attr_features[a] for a in range(k)), dim=-1))
    d = torch.stack(descriptions)
    ia_sum = 0.0
    for j in range(n):
        for i in range(b):
            target = sample_index[i : i + 1]
            image_to_text = s * d @ tokens[i, j]
            text_to_image = s * tokens[:, j] @ d[i]
            ia_sum = ia_sum + 0.5 * (
                F.cross_entropy(image_to_text[None], target) + F.cross_entropy(text_to_image[None], target)
            )
    ic, ca, ia = ic_sum / (b * n), ca_sum / b, ia_sum / (b * n)
    loss = cfg.lambda_ce * ce + cfg.lambda_ic * ic + cfg.lambda_ca * ca + cfg.lambda_ia * ia
    return {"loss": loss, "ce": ce, "ic": ic, "ca": ca, "ia": ia}
