"""CLIP-Lung (Lei et al., MICCAI 2023, arXiv 2304.08013) and its baselines as one module.

Notation for a batch of ``B`` nodules: labels ``y_i``; mean reader ratings ``r_i ∈ R^8``;
image tokens ``v_ij ∈ R^E`` (``j = 1..n``, ``n = n_ctx``, L2-normalised, see
:mod:`~cliplung.model.image_encoder`); class text features ``t_ic`` (``c = 1..C``) and attribute text
features ``a_ik`` (``k = 1..K``, ``K = 8``), L2-normalised outputs of the text tower on image ``i``'s
prompts (:mod:`~cliplung.model.prompts`); ``s = exp(logit_scale)``, a learned scalar initialised at
``model.logit_scale_init`` (ln 100) and, as published, not clamped.

Attribute weights: ``w_i = softmax(r̃_i)`` with ``r̃`` each rating scaled to [0, 1] by its LIDC range
(:func:`~cliplung.model.attributes.scale_ratings`), as published (softmax of the weights). With
``attribute_prompts: rating`` the prompts already state the ratings, so ``w_ik = 1/K``.

Losses (every cross-entropy ``CE`` averaged over its rows)::

    CE  = CE(head(pool(F_i)), y_i)                                           classification
    IC  = 1/(B n) Σ_i Σ_j CE( s·⟨v_ij, t_ic⟩ over c , y_i )                 image ↔ class
    CA  = 1/B Σ_i CE( s/K · Σ_k w_ik ⟨t_ic, a_ik⟩ over c , y_i )            class ↔ attribute
    d_i = normalize(Σ_k w_ik a_ik)                                           weighted description
    IA  = 1/(2 B n) Σ_j Σ_i [ CE( s·⟨v_ij, d_b⟩ over b , i )                image → description
                            + CE( s·⟨v_bj, d_i⟩ over b , i ) ]              description → image
    loss = λ_CE·CE + λ_IC·IC + λ_CA·CA + λ_IA·IA

Several workers (``model.ia_negatives: global``): IA is the only term that couples samples. Each
worker gathers every worker's ``v`` and ``d`` (an all-gather whose backward sums each chunk's
gradients back to its owner) and scores its own rows against all of them, so ``b`` runs over the
whole global micro-batch; the mean of the workers' losses (what data parallelism optimises) is then
the one-worker loss at that batch, whatever the worker count. CE, IC and CA are per-sample means
and need nothing.

Defects of the published code fixed here:

* IC: its targets were the first ``n`` labels of the *batch* (``label[j]`` for token ``j``), not the
  sample's own label; here every token of image ``i`` is scored against ``y_i``.
* IA: it averaged ``n`` token-vs-attribute logits into an ``n``-way vector and fed it to a
  cross-entropy over *class* labels (meaningless, and undefined when ``n < C``); here IA is a
  symmetric InfoNCE in which each image token must pick its own nodule's weighted attribute
  description ``d_i`` among the batch's (and each description its own image), per channel group.
* Speed: it ran the text tower once per sample in a Python loop over 77-token prompts; here all
  ``B·(C + K)`` prompts of a batch go through the tower in one call: one packed sequence per image
  holds its prompts as a prefix tree (SOT, context and shared words run once, nothing after an
  EOT), with an ancestor mask that shows every token exactly what the causal mask shows it in its
  own prompt, so the features are unchanged; :mod:`~cliplung.model.reference` keeps the per-sample
  77-token form for tests and benchmarks.

Methods (``model.method``), all with the same image encoder and head: ``ce`` (CE only, no text
tower), ``coop``, ``cocoop``, ``cliplung`` (the three prompt learners, same losses).

Inference costs no text: :meth:`CLIPLung.predict` runs the image encoder and head only.

GPU notes: the training forward reads nothing back to the host and copies nothing from it (its
constants, prompt token ids and rating bounds, are buffers on the model's device), so a step queues
its kernels without waiting; ``tests/test_gpu_paths.py`` checks that on a fake CUDA device.

DeepSpeed notes: forward mutates no Python state; prompt token ids are buffers; every parameter that
requires a gradient takes part in every training forward (all loss parts are computed even when
their λ is 0). Parameters that never require a gradient: the text tower's token-embedding table
(always frozen) and, with ``text_trainable: false``, the whole text tower — pass only
``requires_grad`` parameters to the optimizer.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cliplung.config import CLASS_NAMES_2, CLASS_NAMES_3, ModelConfig
from cliplung.model.attributes import rating_bounds, rating_levels, scale_ratings
from cliplung.model.image_encoder import GroupTokens, NoduleClassifier, build_image_encoder
from cliplung.model.prompts import PromptLearner
from cliplung.model.text_encoder import TextEncoder

__all__ = [
    "CLIPLung",
    "attribute_weights",
    "build_classifier",
    "build_model",
    "class_names_for",
    "contrastive_losses",
]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses run in fp32 (or fp64 when the model is fp64) even for a bf16 model."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _no_autocast(device: torch.device):
    """Autocast off for the losses' own fp32 maths (a no-op context on devices without autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def class_names_for(num_classes: int) -> tuple[str, ...]:
    """3 → benign / unsure / malignant; 2 → benign / malignant."""
    if num_classes == 3:
        return CLASS_NAMES_3
    if num_classes == 2:
        return CLASS_NAMES_2
    raise ValueError(f"num_classes must be 2 or 3, got {num_classes}")


def attribute_weights(
    attributes: torch.Tensor, attribute_prompts: str = "name", bounds: torch.Tensor | None = None
) -> torch.Tensor:
    """``w = softmax(r̃)`` over the 8 attributes (``name`` prompts) or uniform ``1/8`` (``rating``)."""
    scaled = scale_ratings(attributes, bounds)
    if attribute_prompts == "rating":
        return torch.full_like(scaled, 1.0 / scaled.shape[-1])
    return scaled.softmax(dim=-1)


class _GatherWithGrad(torch.autograd.Function):
    """All workers' ``(b, ...)`` tensors concatenated along dim 0, with gradients back to their owners:
    the backward sums every worker's gradient of each chunk (every worker's loss uses every chunk)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            own = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
            dist.reduce_scatter_tensor(own, grad)
            return own
        dist.all_reduce(grad)  # gloo has no reduce-scatter of a tensor: reduce all, keep this rank's rows
        return grad.chunk(world)[rank].contiguous()


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def contrastive_losses(
    tokens: torch.Tensor,
    class_features: torch.Tensor,
    attr_features: torch.Tensor,
    weights: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    global_negatives: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IC, CA, IA of the module docstring.

    ``tokens (B, n, E)``, ``class_features (B, C, E)``, ``attr_features (B, K, E)`` (all normalised),
    ``weights (B, K)``, ``labels (B,)``, ``logit_scale`` a scalar (``s = exp(logit_scale)``).
    ``global_negatives``: in a process group of several workers (equal ``B`` on each), IA scores this
    worker's rows against every worker's tokens and descriptions (module docstring).
    """
    b, n, _ = tokens.shape
    k = attr_features.shape[1]
    s = logit_scale.exp()
    ic_logits = s * torch.einsum("bje,bce->bjc", tokens, class_features)
    ic = F.cross_entropy(ic_logits.reshape(b * n, -1), labels.repeat_interleave(n))
    ca_logits = (s / k) * torch.einsum("bce,bke,bk->bc", class_features, attr_features, weights)
    ca = F.cross_entropy(ca_logits, labels)
    descriptions = F.normalize(torch.einsum("bk,bke->be", weights, attr_features), dim=-1)
    all_tokens, all_descriptions, first = tokens, descriptions, 0
    rank, world = _world()
    if global_negatives and world > 1:
        all_tokens = _GatherWithGrad.apply(tokens)
        all_descriptions = _GatherWithGrad.apply(descriptions)
        first = rank * b
    # (n, this worker's image, any description) and (n, this worker's description, any image)
    image_to_text = s * torch.einsum("bje,de->jbd", tokens, all_descriptions)
    text_to_image = s * torch.einsum("be,dje->jbd", descriptions, all_tokens)
    target = (torch.arange(b, device=tokens.device) + first).repeat(n)
    ia = 0.5 * (
        F.cross_entropy(image_to_text.reshape(n * b, -1), target)
        + F.cross_entropy(text_to_image.reshape(n * b, -1), target)
    )
    return ic, ca, ia


class CLIPLung(nn.Module):
    """The model for every ``model.method``; see the module docstring for the maths.

    ``forward(images, labels=None, attributes=None)``: ``images (B, D, H, W)`` in [0, 1];
    returns ``{"logits"}`` and, when ``labels`` are given, ``"loss"`` and ``"parts"`` (detached
    ``ce``, and ``ic``, ``ca``, ``ia`` for the prompt methods). ``attributes (B, 8)`` mean ratings are
    required with labels for every method but ``ce``.
    """

    def __init__(
        self, config: ModelConfig, *, num_classes: int, patch_size: int, load_pretrained: bool = True
    ):
        super().__init__()
        self.config = config
        self.method = config.method
        class_names = class_names_for(num_classes)
        self.class_names = class_names
        encoder = build_image_encoder(
            config.image_encoder,
            patch_size=patch_size,
            width=config.image_width,
            feature_channels=config.feature_channels,
        )
        self.classifier = NoduleClassifier(encoder, num_classes)
        self.text_encoder: TextEncoder | None = None
        self.image_tokens: GroupTokens | None = None
        self.prompts: PromptLearner | None = None
        self.logit_scale: nn.Parameter | None = None
        if self.method != "ce":
            self.text_encoder = TextEncoder(
                config.text_model,
                pretrained=config.text_pretrained if load_pretrained else None,
                trainable=config.text_trainable,
            )
            self.image_tokens = GroupTokens(encoder, config.n_ctx, self.text_encoder.embed_dim)
            self.prompts = PromptLearner(
                method=self.method,
                text_encoder=self.text_encoder,
                class_names=class_names,
                n_ctx=config.n_ctx,
                ctx_init=config.ctx_init,
                meta_hidden=config.meta_hidden,
                attribute_prompts=config.attribute_prompts,
            )
            # Shape (1,), not (): DeepSpeed's parameter broadcast cannot view a 0-dim bf16 tensor as bytes.
            self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init)))
            self.register_buffer("rating_bounds", rating_bounds(), persistent=False)

    # ------------------------------------------------------------------ inference

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits from the image encoder and head alone (no text tower)."""
        return self.classifier(images)

    # ------------------------------------------------------------------ training

    def encode_prompts(
        self, tokens: torch.Tensor, attributes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class and attribute text features of every image, ``(B, C, E)`` and ``(B, 8, E)``, normalised.

        All ``B·(C+K)`` prompts of the batch go through the text tower in one call: one packed
        sequence per image holds its prompts as a prefix tree (SOT, context and shared words such as
        "the nodule is" run once; nothing after any EOT), exact under the causal mask
        (:meth:`PromptLearner.pack`). coop has one context for the whole batch, so every prompt
        (``C + K·R``) runs once and the images gather theirs.
        """
        prompts, text = self.prompts, self.text_encoder
        ctx = prompts.contexts(tokens)  # (Bc, n, W), Bc = B or 1
        b, bc = tokens.shape[0], ctx.shape[0]
        k, r, c = prompts.attr_ids.shape[0], prompts.n_levels, prompts.num_classes
        device = tokens.device
        if prompts.attribute_prompts == "rating":
            levels = rating_levels(attributes, self.rating_bounds)
        else:
            levels = torch.zeros(b, k, dtype=torch.long, device=device)
        attr_index = c + torch.arange(k, device=device) * r + levels  # (B, K) prompt indices
        if bc == 1:
            select = torch.arange(c + k * r, device=device).unsqueeze(0)
        else:
            select = torch.cat([torch.arange(c, device=device).expand(b, c), attr_index], dim=1)
        features = text.forward_packed(*prompts.pack(ctx, select, text))
        features = F.normalize(_at_least_fp32(features), dim=-1)  # (Bc, P, E)
        if bc == 1:
            return features[:, :c].expand(b, -1, -1), features[0, attr_index]
        return features[:, :c], features[:, c:]

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        attributes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        fmap = self.classifier.encoder(images)
        logits = self.classifier.logits_from(fmap)
        out: dict[str, torch.Tensor | dict[str, torch.Tensor]] = {"logits": logits}
        if labels is None:
            return out
        cfg = self.config
        ce = F.cross_entropy(_at_least_fp32(logits), labels)
        loss = cfg.lambda_ce * ce
        parts = {"ce": ce.detach()}
        if self.method != "ce":
            if attributes is None:
                raise ValueError(f"model.method={self.method!r}: forward needs attributes (B, 8) with labels")
            tokens = self.image_tokens(fmap)
            class_features, attr_features = self.encode_prompts(tokens, attributes)
            weights = attribute_weights(attributes, cfg.attribute_prompts, self.rating_bounds)
            with _no_autocast(tokens.device):
                ic, ca, ia = contrastive_losses(
                    _at_least_fp32(tokens),
                    class_features,
                    attr_features,
                    weights.to(class_features.dtype),
                    labels,
                    _at_least_fp32(self.logit_scale[0]),
                    global_negatives=cfg.ia_negatives == "global",
                )
            loss = loss + cfg.lambda_ic * ic + cfg.lambda_ca * ca + cfg.lambda_ia * ia
            parts.update(ic=ic.detach(), ca=ca.detach(), ia=ia.detach())
        out["loss"] = loss
        out["parts"] = parts
        return out


def build_model(
    config: ModelConfig, *, num_classes: int, patch_size: int, load_pretrained: bool = True
) -> CLIPLung:
    """The model of ``config.method``. ``load_pretrained=False`` skips ``text_pretrained`` (e.g. when a
    full checkpoint is restored right after)."""
    return CLIPLung(config, num_classes=num_classes, patch_size=patch_size, load_pretrained=load_pretrained)


def build_classifier(config: ModelConfig, *, num_classes: int, patch_size: int) -> NoduleClassifier:
    """The inference part alone (image encoder + head), as :func:`build_model` would build it."""
    encoder = build_image_encoder(
        config.image_encoder,
        patch_size=patch_size,
        width=config.image_width,
        feature_channels=config.feature_channels,
    )
    return NoduleClassifier(encoder, num_classes)
