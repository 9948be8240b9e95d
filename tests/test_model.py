"""CLIP-Lung model: shapes, gradients, learning, config errors (debug sizes, CPU, seconds)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch_threads import one_torch_thread  # noqa: F401 - autouse fixture

from cliplung.config import ATTRIBUTES, CLASS_NAMES_2, ConfigError, ModelConfig, apply_overrides, preset
from cliplung.model import attribute_weights, build_model, scale_ratings
from cliplung.model.attributes import RATING_PROMPTS, RATING_RANGES, rating_levels

PATCH = 16


def debug_model_config(**changes) -> ModelConfig:
    return dataclasses.replace(preset("debug").model, **changes)


def batch(b: int = 4, num_classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, PATCH, PATCH, PATCH, generator=g)
    labels = torch.arange(b) % num_classes
    lo = torch.tensor([RATING_RANGES[a][0] for a in ATTRIBUTES], dtype=torch.float)
    hi = torch.tensor([RATING_RANGES[a][1] for a in ATTRIBUTES], dtype=torch.float)
    attributes = lo + (hi - lo) * torch.rand(b, 8, generator=g)
    return images, labels, attributes


@pytest.mark.parametrize("method", ["ce", "coop", "cocoop", "cliplung"])
@pytest.mark.parametrize("n_ctx", [1, 2, 4, 8, 16])
def test_shapes_every_method_and_prompt_length(method: str, n_ctx: int) -> None:
    torch.manual_seed(0)
    model = build_model(debug_model_config(method=method, n_ctx=n_ctx), num_classes=3, patch_size=PATCH)
    images, labels, attributes = batch()
    out = model(images, labels=labels, attributes=attributes)
    assert out["logits"].shape == (4, 3)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    expected = {"ce"} if method == "ce" else {"ce", "ic", "ca", "ia"}
    assert set(out["parts"]) == expected
    assert all(not v.requires_grad and v.ndim == 0 for v in out["parts"].values())
    if method != "ce":
        fmap = model.classifier.encoder(images)
        tokens = model.image_tokens(fmap)
        assert tokens.shape == (4, n_ctx, model.text_encoder.embed_dim)
        torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(4, n_ctx))
        ctx = model.prompts.contexts(tokens)
        assert ctx.shape == ((1 if method == "coop" else 4), n_ctx, model.text_encoder.width)
        class_f, attr_f = model.encode_prompts(tokens, attributes)
        assert class_f.shape == (4, 3, 64) and attr_f.shape == (4, 8, 64)
    no_labels = model(images)
    assert set(no_labels) == {"logits"}
    torch.testing.assert_close(model.eval().predict(images), model(images)["logits"])


def test_two_class_and_3d_encoder_and_rating_prompts() -> None:
    model = build_model(
        debug_model_config(image_encoder="resnet18_3d", attribute_prompts="rating"),
        num_classes=2,
        patch_size=PATCH,
    )
    images, labels, attributes = batch(num_classes=2)
    out = model(images, labels=labels, attributes=attributes)
    assert out["logits"].shape == (4, 2)
    assert model.prompts.num_classes == len(CLASS_NAMES_2)
    assert model.image_tokens.proj is not None  # 3D group dim (4·2³ = 32) differs from E = 64
    out["loss"].backward()


def test_published_geometry_needs_no_token_projection() -> None:
    # Paper sizes: 512×4×4 → 128×8×8 → 1×1 conv 32×8×8; 4 groups of 8·8·8 = 512 = ViT-B-16's embed dim.
    from cliplung.model.image_encoder import GroupTokens, build_image_encoder

    enc = build_image_encoder("resnet18_2d", patch_size=32, width=64, feature_channels=32)
    fmap = enc(torch.rand(2, 32, 32, 32))
    assert fmap.shape == (2, 32, 8, 8)
    assert enc.pool(fmap).shape == (2, 512)
    tokens = GroupTokens(enc, 4, 512)
    assert tokens.proj is None and tokens(fmap).shape == (2, 4, 512)


def _grad_norms(model, loss) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {
        n: (p.grad.abs().sum().item() if p.grad is not None else None) for n, p in model.named_parameters()
    }


def test_gradients_reach_every_trainable_part() -> None:
    torch.manual_seed(0)
    model = build_model(debug_model_config(), num_classes=3, patch_size=PATCH)
    images, labels, attributes = batch()
    grads = _grad_norms(model, model(images, labels=labels, attributes=attributes)["loss"])
    for name in (
        "prompts.ctx",
        "prompts.meta_net.0.weight",
        "prompts.meta_net.2.weight",
        "logit_scale",
        "classifier.encoder.conv1.weight",
        "classifier.encoder.conv1x1.weight",
        "classifier.head.weight",
        "text_encoder.tower.transformer.resblocks.0.attn.in_proj_weight",
        "text_encoder.tower.text_projection",
        "text_encoder.tower.positional_embedding",
    ):
        assert grads[name] is not None and grads[name] > 0, name
    # Every parameter that requires a gradient gets one (DeepSpeed ZeRO-2 needs no unused params).
    missing = [n for n, p in model.named_parameters() if p.requires_grad and grads[n] is None]
    assert missing == []
    assert grads["text_encoder.tower.token_embedding.weight"] is None  # always frozen


def test_frozen_text_tower_gets_no_gradient() -> None:
    model = build_model(debug_model_config(text_trainable=False), num_classes=3, patch_size=PATCH)
    images, labels, attributes = batch()
    grads = _grad_norms(model, model(images, labels=labels, attributes=attributes)["loss"])
    assert all(v is None for n, v in grads.items() if n.startswith("text_encoder."))
    assert grads["prompts.ctx"] > 0 and grads["prompts.meta_net.0.weight"] > 0


def test_coop_has_no_meta_net_and_cocoop_one_bias() -> None:
    coop = build_model(debug_model_config(method="coop"), num_classes=3, patch_size=PATCH)
    assert coop.prompts.meta_net is None
    cocoop = build_model(debug_model_config(method="cocoop"), num_classes=3, patch_size=PATCH)
    tokens = torch.nn.functional.normalize(torch.randn(2, 4, 64), dim=-1)
    ctx = cocoop.prompts.contexts(tokens) - cocoop.prompts.ctx
    torch.testing.assert_close(ctx[:, 0], ctx[:, 3])  # the same bias on every context token
    ccp = build_model(debug_model_config(), num_classes=3, patch_size=PATCH).prompts
    bias = ccp.contexts(tokens) - ccp.ctx
    assert not torch.allclose(bias[:, 0], bias[:, 3])  # token j conditioned by channel group j


def test_loss_falls_on_a_separable_synthetic_set() -> None:
    torch.manual_seed(0)
    model = build_model(debug_model_config(), num_classes=3, patch_size=PATCH)
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(12) % 3
    images = 0.1 * torch.rand(12, PATCH, PATCH, PATCH, generator=g)
    for i, y in enumerate(labels.tolist()):  # class = which third of the slices is bright
        images[i, 5 * y : 5 * y + 5] += 0.8
    attributes = 1.0 + labels[:, None].float().expand(12, 8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(images, labels=labels, attributes=attributes)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    model.eval()
    assert (model.predict(images).argmax(1) == labels).float().mean() >= 0.9


def test_attribute_scaling_and_weights() -> None:
    ratings = torch.tensor(
        [[1, 1, 1, 1, 1, 1, 1, 1], [5, 4, 6, 5, 5, 5, 5, 5], [3, 2.5, 3.5, 3, 3, 3, 3, 3]], dtype=torch.float
    )
    scaled = scale_ratings(ratings)
    torch.testing.assert_close(scaled[0], torch.zeros(8))
    torch.testing.assert_close(scaled[1], torch.ones(8))
    torch.testing.assert_close(scaled[2], torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(
        scale_ratings(torch.tensor([[9.0, 0, float("nan"), 1, 1, 1, 1, 1]]))[0, :3], torch.tensor([1.0, 0, 0])
    )
    w = attribute_weights(ratings)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    torch.testing.assert_close(w, torch.softmax(scaled, 1))
    torch.testing.assert_close(attribute_weights(ratings, "rating"), torch.full((3, 8), 1 / 8))
    levels = rating_levels(ratings)
    assert levels[0].tolist() == [0] * 8
    assert levels[1].tolist() == [RATING_RANGES[a][1] - 1 for a in ATTRIBUTES]
    assert (
        RATING_PROMPTS["spiculation"][levels[1, ATTRIBUTES.index("spiculation")]]
        == "the nodule has marked spiculation."
    )


def test_prompt_ids_are_cut_after_the_longest_prompt_and_keep_eot() -> None:
    prompts = build_model(debug_model_config(n_ctx=16), num_classes=3, patch_size=PATCH).prompts
    ids = torch.cat([prompts.class_ids, prompts.attr_ids.flatten(0, 1)])
    eot = torch.cat([prompts.class_eot, prompts.attr_eot.flatten()])
    assert ids.shape[1] == int(eot.max()) + 1 < 77
    assert torch.equal(ids.argmax(1), eot)  # open_clip's argmax pooling finds the same EOT
    assert (ids[torch.arange(len(eot)), eot] == 49407).all()
    assert (ids[:, 1:17] == ids[0, 1]).all()  # 16 context placeholders after SOT
    assert prompts.state_dict().keys() == {
        "ctx",
        "meta_net.0.weight",
        "meta_net.0.bias",
        "meta_net.2.weight",
        "meta_net.2.bias",
    }


def test_context_initialised_from_ctx_init() -> None:
    from cliplung.model.text_encoder import simple_tokenizer

    model = build_model(debug_model_config(n_ctx=4), num_classes=3, patch_size=PATCH)
    words = simple_tokenizer().encode("a nodule image of")[:4]
    expected = model.text_encoder.tower.token_embedding.weight[words]
    torch.testing.assert_close(model.prompts.ctx.detach(), expected)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("model.n_ctx=0", "model.n_ctx"),
        ("model.n_ctx=3", "model.n_ctx"),
        ("model.lambda_ia=-1", "model.lambda_ia"),
        ("model.lambda_ic=-0.5", "model.lambda_ic"),
        ("model.method=clip", "model.method"),
        ("model.image_encoder=vit", "model.image_encoder"),
        ("model.attribute_prompts=free", "model.attribute_prompts"),
    ],
)
def test_bad_config_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}\b"):
        apply_overrides(preset("debug"), [override])


def test_unknown_text_model_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^model\.text_model"):
        build_model(debug_model_config(text_model="no-such-model"), num_classes=3, patch_size=PATCH)


def test_wrong_input_shape_and_missing_attributes() -> None:
    model = build_model(debug_model_config(), num_classes=3, patch_size=PATCH)
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 8, 16, 16))
    with pytest.raises(ValueError, match="attributes"):
        model(torch.rand(2, 16, 16, 16), labels=torch.tensor([0, 1]))


def test_bf16_parameters_with_fp32_buffers_as_deepspeed_casts_them() -> None:
    # DeepSpeed bf16 casts parameters only; BatchNorm must cope with bf16 weights + fp32 statistics.
    model = build_model(debug_model_config(), num_classes=3, patch_size=PATCH)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    images, labels, attributes = batch()
    stats = model.classifier.encoder.bn1.running_mean.clone()
    out = model(images.to(torch.bfloat16), labels=labels, attributes=attributes)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert model.prompts.ctx.grad is not None and model.classifier.encoder.conv1.weight.grad is not None
    assert model.classifier.encoder.bn1.running_mean.dtype == torch.float32
    assert not torch.equal(model.classifier.encoder.bn1.running_mean, stats)
