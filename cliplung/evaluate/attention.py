"""Attention maps: Grad-CAM of the image encoder's last convolutional stage.

**Method.** Grad-CAM (Selvaraju et al., ICCV 2017): with ``A_k`` the maps of the last stage (ResNet
``layer4``) and ``y_c`` the logit of class ``c``, ``α_k = mean over positions of ∂y_c/∂A_k`` and
``CAM = ReLU(Σ_k α_k A_k)``, upsampled to the patch and scaled to [0, 1] per nodule. ``c`` is the
predicted class, so the map shows the evidence for the decision the model made.

**Why this method.** It is class-discriminative and needs one forward and one backward pass with no
change to the model, so it explains the exact exported classifier that is evaluated. The
alternatives fit worse: CAM (Zhou et al., 2016) needs global average pooling directly before the
linear head, while here a 1×1 conv and a 4×4 (2D) or 2×2×2 (3D) pooling come between; plain input
gradients (saliency) are noisy on 16–32 voxel patches; occlusion needs one forward per position;
attention rollout is for transformers. Why ``layer4`` and not the 1×1-conv feature map ``F`` that
feeds the head: for the 2D encoder ``F`` comes from a plain ``view`` of layer 4's ``(8w, h, h)`` as
``(2w, 2h, 2h)`` (as published), which tiles four channels' maps into one, so ``F``'s positions are
not image positions. Layer 4 is the last map whose positions are.

**Resolution.** Layer 4 has stride 8: a ``⌈P/8⌉`` grid (4×4 for the paper's 32³ patches, 2×2 for
the debug preset's 16³), upsampled bilinearly (2D) or trilinearly (3D). The maps show which part of
the patch mattered, not voxel-level detail.

**2D vs 3D.** ``resnet18_2d`` takes the axial slices as input *channels*, so its layer-4 map, and the
CAM, is 2D in-plane: one map for the whole patch, shown over the middle axial slice; it cannot say
which slice mattered. ``resnet18_3d`` gives a 3D CAM; its middle axial slice is shown.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cliplung.model.image_encoder import NoduleClassifier

__all__ = ["axial_cams", "grad_cam", "middle_axial_slice"]


def grad_cam(
    model: NoduleClassifier, images: torch.Tensor, target: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps of ``images`` ``(B, D, H, W)`` for ``target`` classes (default: predicted).

    Returns ``(cams, targets)``: cams ``(B, H, W)`` for the 2D encoder (in-plane), ``(B, D, H, W)``
    for the 3D encoder, float32 in [0, 1] (all zero when no position supports the class); targets
    ``(B,)`` the explained classes. The model's parameters and mode are left as they were.
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.shape[0] == 0:
        encoder = model.encoder
        shape = images.shape[2:] if encoder.dims == 2 else images.shape[1:]
        return np.zeros((0, *shape), dtype=np.float32), np.zeros(0, dtype=np.int64)
    captured: dict[str, torch.Tensor] = {}

    def keep_output(_module, _inputs, output):
        captured["maps"] = output

    was_training = model.training
    model.eval()
    handle = model.encoder.layer4.register_forward_hook(keep_output)
    try:
        with torch.enable_grad():
            # The input requires a gradient so the maps do even when the weights are frozen (an EMA
            # copy); torch.autograd.grad leaves the parameters' .grad untouched.
            x = images.detach().clone().requires_grad_(True)
            logits = model(x)
            chosen = logits.argmax(dim=1) if target is None else torch.as_tensor(target, dtype=torch.long)
            score = logits.gather(1, chosen[:, None]).sum()  # samples are independent in eval mode
            maps = captured["maps"]
            (grads,) = torch.autograd.grad(score, maps)
    finally:
        handle.remove()
        model.train(was_training)
    spatial = tuple(range(2, maps.ndim))
    weights = grads.mean(dim=spatial, keepdim=True)
    cam = F.relu((weights * maps).sum(dim=1, keepdim=True)).detach()
    if model.encoder.dims == 2:
        cam = F.interpolate(cam, size=tuple(images.shape[2:]), mode="bilinear", align_corners=False)
    else:
        cam = F.interpolate(cam, size=tuple(images.shape[1:]), mode="trilinear", align_corners=False)
    cam = cam[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, *([1] * (cam.ndim - 1)))
    cam = torch.where(peak > 1e-12, cam / peak, torch.zeros_like(cam))
    return cam.numpy().astype(np.float32), chosen.detach().numpy().astype(np.int64)


def middle_axial_slice(patch: np.ndarray) -> np.ndarray:
    """The middle axial (z) slice of a ``(D, H, W)`` patch (index ``D // 2``)."""
    return np.asarray(patch)[np.asarray(patch).shape[0] // 2]


def axial_cams(cams: np.ndarray) -> np.ndarray:
    """``(B, H, W)`` maps to overlay: 2D-encoder CAMs as they are, 3D CAMs at their middle axial slice."""
    cams = np.asarray(cams)
    return cams if cams.ndim == 3 else cams[:, cams.shape[1] // 2]
