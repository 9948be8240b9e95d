"""Image encoders: a patch ``(B, D, H, W)`` → a feature map → pooled features and image tokens.

Two backbones, both ResNet-18 (BasicBlock, [2, 2, 2, 2]) trained from scratch, 3×3 stem, no max-pool,
stage strides 1, 2, 2, 2 and stage widths ``w, 2w, 4w, 8w`` (``w = model.image_width``):

``resnet18_2d`` (as published)
    CIFAR-style 2D ResNet whose input channels are the ``D`` axial slices. Its layer-4 map
    ``(8w, h, h)``, ``h = ⌈P/8⌉``, is reshaped (a plain ``view``, as published) to ``(2w, 2h, 2h)``;
    a 1×1 conv gives the feature map ``F = (C, 2h, 2h)``, ``C = model.feature_channels``.
    Published sizes: ``512×4×4 → 128×8×8 → 32×8×8``.
``resnet18_3d``
    The same network with 3D convolutions on the single-channel volume; a 1×1×1 conv on the
    layer-4 map ``(8w, h, h, h)`` gives ``F = (C, h, h, h)``.

From ``F`` (:class:`NoduleClassifier`, :class:`GroupTokens`):

* pooled features for the classification head: ``adaptive_avg_pool(F)`` to ``4×4`` (2D) or
  ``2×2×2`` (3D), flattened; ``logits = W_h · pooled + b_h``. As published: ``32×8×8 → 32×4×4``.
* image tokens: ``F`` is split along channels into ``n = model.n_ctx`` groups of ``C/n`` channels;
  group ``j`` flattened is ``g_j ∈ R^G``, ``G = (C/n)·|spatial|``. The token is
  ``v_j = P g_j / ‖P g_j‖`` where ``P`` is the identity when ``G`` equals the joint embedding width
  ``E`` (as published: ``8·8·8 = 512``) and a learned bias-free linear map ``R^G → R^E`` otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupTokens", "ImageEncoder", "NoduleClassifier", "build_image_encoder", "stage_size"]


def stage_size(patch_size: int) -> int:
    """Edge of the layer-4 map: three stride-2 3×3 convs with padding 1 (``⌈n/2⌉`` each)."""
    h = patch_size
    for _ in range(3):
        h = (h + 1) // 2
    return h


class _Fp32BatchNorm:
    """BatchNorm that normalises in fp32 whatever the dtype of its input, weights and statistics.

    Training keeps fp32 weights (bf16 is autocast's business), and the stock kernels take a bf16
    input with fp32 weights and statistics as they are (autocast's output of a convolution): that is
    the stock path. A model whose parameters were cast to bf16 with fp32 buffers (a mix
    ``F.batch_norm`` rejects; fp32 statistics are also what a 0.1-momentum average needs) normalises
    in fp32 here. The output has the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == self.running_mean.dtype and self.weight.dtype in (
            torch.float32,
            torch.float64,
        ):
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        mean, var = self.running_mean.float(), self.running_var.float()
        out = F.batch_norm(
            x.float(), mean, var, self.weight.float(), self.bias.float(), self.training, factor, self.eps
        )
        if self.training and mean.dtype != self.running_mean.dtype:  # updated fp32 copies: write back
            with torch.no_grad():
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
        return out.to(x.dtype)


class BatchNorm2d(_Fp32BatchNorm, nn.BatchNorm2d):
    pass


class BatchNorm3d(_Fp32BatchNorm, nn.BatchNorm3d):
    pass


class _BasicBlock(nn.Module):
    def __init__(self, conv: type[nn.Module], norm: type[nn.Module], c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = conv(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = conv(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                conv(c_in, c_out, kernel_size=1, stride=stride, bias=False), norm(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ImageEncoder(nn.Module):
    """ResNet-18 backbone + 1×1 conv: patch ``(B, D, H, W)`` in [0, 1] → feature map ``F``.

    ``dims=2``: slices as channels, layer-4 map reshaped to ``(2w, 2h, 2h)`` (published);
    ``dims=3``: single-channel volume. Attributes ``feature_channels`` (``C``), ``spatial``
    (the shape of ``F`` after the channel axis) and ``pooled_dim`` describe the output.
    """

    def __init__(self, *, dims: int, patch_size: int, width: int, feature_channels: int):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = BatchNorm2d if dims == 2 else BatchNorm3d
        self.dims = dims
        self.patch_size = patch_size
        self.feature_channels = feature_channels
        c_in = patch_size if dims == 2 else 1
        self.conv1 = conv(c_in, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm(width)
        stages = []
        c = width
        for i, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2**i
            stages.append(
                nn.Sequential(
                    _BasicBlock(conv, norm, c, c_out, stride), _BasicBlock(conv, norm, c_out, c_out, 1)
                )
            )
            c = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        h = stage_size(patch_size)
        if dims == 2:
            # (8w, h, h) viewed as (2w, 2h, 2h): the published reshape (512×4×4 → 128×8×8).
            self._reshaped = (c // 4, 2 * h, 2 * h)
            self.spatial: tuple[int, ...] = (2 * h, 2 * h)
            self._pool_to: tuple[int, ...] = (4, 4)
        else:
            self._reshaped = None
            self.spatial = (h, h, h)
            self._pool_to = (2, 2, 2)
        self.conv1x1 = conv(self._reshaped[0] if dims == 2 else c, feature_channels, kernel_size=1)
        self.pooled_dim = feature_channels * int(torch.tensor(self._pool_to).prod())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W)`` → ``F``: ``(B, C, 2h, 2h)`` (2D) or ``(B, C, h, h, h)`` (3D)."""
        if images.ndim != 4 or images.shape[1] != self.patch_size:
            raise ValueError(
                f"images: expected (B, {self.patch_size}, {self.patch_size}, {self.patch_size}), "
                f"got {tuple(images.shape)}"
            )
        # Patches arrive in whatever dtype the caller uses (a bf16 engine, the fp32 EMA copy): follow
        # the weights'.
        images = images.to(self.conv1.weight.dtype)
        x = images if self.dims == 2 else images.unsqueeze(1)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self._reshaped is not None:
            x = x.reshape(x.shape[0], *self._reshaped)
        return self.conv1x1(x)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """Pooled features for the head, ``(B, pooled_dim)``."""
        pool = F.adaptive_avg_pool2d if self.dims == 2 else F.adaptive_avg_pool3d
        return pool(fmap, self._pool_to).flatten(1)


def build_image_encoder(kind: str, *, patch_size: int, width: int, feature_channels: int) -> ImageEncoder:
    """``kind``: ``resnet18_2d`` or ``resnet18_3d`` (``model.image_encoder``)."""
    dims = {"resnet18_2d": 2, "resnet18_3d": 3}.get(kind)
    if dims is None:
        raise ValueError(f"model.image_encoder: unknown encoder {kind!r}")
    return ImageEncoder(dims=dims, patch_size=patch_size, width=width, feature_channels=feature_channels)


class NoduleClassifier(nn.Module):
    """Image encoder + linear head: everything inference needs (``logits = head(pool(F))``).

    The same module is the whole ``ce`` baseline and the inference part of every other method, so an
    exported CLIP-Lung model has exactly the parameters of ``ce``.
    """

    def __init__(self, encoder: ImageEncoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.pooled_dim, num_classes)

    def logits_from(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.pool(fmap))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from(self.encoder(images))


class GroupTokens(nn.Module):
    """Feature map → ``n_ctx`` L2-normalised image tokens ``(B, n_ctx, E)`` (one per channel group).

    ``v_j = P g_j / ‖P g_j‖``, ``g_j`` the flattened channel group ``j``; ``P`` is the identity when
    ``G = (C/n)·|spatial|`` equals ``E``, else a bias-free ``nn.Linear(G, E)`` (``proj``).
    """

    def __init__(self, encoder: ImageEncoder, n_ctx: int, embed_dim: int):
        super().__init__()
        if encoder.feature_channels % n_ctx:
            raise ValueError(
                f"model.n_ctx: must divide feature_channels={encoder.feature_channels}, got {n_ctx}"
            )
        self.n_ctx = n_ctx
        self.group_dim = encoder.feature_channels // n_ctx * int(torch.tensor(encoder.spatial).prod())
        self.proj = None if self.group_dim == embed_dim else nn.Linear(self.group_dim, embed_dim, bias=False)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        # Channels are contiguous per group, so a reshape splits them exactly like torch.split.
        groups = fmap.reshape(fmap.shape[0], self.n_ctx, self.group_dim)
        if self.proj is not None:
            groups = self.proj(groups)
        return F.normalize(groups, dim=-1)
