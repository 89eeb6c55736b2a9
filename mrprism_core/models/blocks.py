"""Building blocks shared by the encoder, ConP, DivP and the baselines.

Everything normalises with GroupNorm or LayerNorm (no BatchNorm), so Opacus can compute
per-sample gradients and small federated batches behave.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "group_norm",
    "ConvNormAct",
    "DownStack",
    "UpBlock",
    "FullResolutionSkip",
    "PatchEmbed",
    "PatchUnembed",
    "Attention",
    "Mlp",
    "sincos_position_encoding",
]


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``max_groups`` that divides ``channels``."""
    groups = min(max_groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class ConvNormAct(nn.Sequential):
    """Conv -> GroupNorm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
            group_norm(cout),
            nn.ReLU(),
        )


class DownStack(nn.Sequential):
    """One stride-2 :class:`ConvNormAct` per width: a small encoder for global summaries."""

    def __init__(self, cin: int, widths: tuple[int, ...]) -> None:
        layers = []
        for width in widths:
            layers.append(ConvNormAct(cin, width, stride=2))
            cin = width
        super().__init__(*layers)
        self.out_channels = cin


class UpBlock(nn.Module):
    """UNet up-sampling step: concatenate the skip feature, deconvolve x2, refine with a conv."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(cin + skip, cout, kernel_size=2, stride=2, bias=False)
        self.norm = group_norm(cout)
        self.refine = ConvNormAct(cout, cout)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.refine(F.relu(self.norm(self.deconv(x))))


class FullResolutionSkip(nn.Module):
    """A decoder's last, full-resolution map refined with the encoder's full-resolution image
    features (``MrPrismArch.full_resolution_width``): concatenate, 3x3 conv."""

    def __init__(self, channels: int, skip: int) -> None:
        super().__init__()
        self.refine = ConvNormAct(channels + skip, channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.refine(torch.cat([x, skip], dim=1))

    @classmethod
    def for_decoder(
        cls, channels: int, deep_to_shallow: Sequence[int]
    ) -> FullResolutionSkip | None:
        """The block for an encoder with a full-resolution map (a sixth entry), else None."""
        return cls(channels, deep_to_shallow[5]) if len(deep_to_shallow) > 5 else None


class PatchEmbed(nn.Module):
    """Flattened ``patch x patch`` patches -> tokens (B, T, dim); pads to a multiple of patch."""

    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % self.patch, (-width) % self.patch
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class PatchUnembed(nn.Module):
    """Tokens (B, T, dim) on a (h, w) grid -> map (B, channels, H, W), cropped to ``size``."""

    def __init__(self, dim: int, channels: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.ConvTranspose2d(dim, channels, kernel_size=patch, stride=patch)

    def forward(self, tokens: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        return self.proj(x)[..., : size[0], : size[1]]


class Attention(nn.Module):
    """Multi-head (cross-)attention on token sequences, computed by PyTorch's fused SDPA kernel."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        return x.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        q, k, v = self._split(self.q(query)), self._split(self.k(key)), self._split(self.v(value))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.out(x.transpose(1, 2).flatten(2))


class Mlp(nn.Sequential):
    """Two linear maps that keep the token dimension (paper: "MLP ... keep the dimension")."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


@lru_cache(maxsize=64)
def _sincos(height: int, width: int, dim: int) -> Tensor:
    if dim % 4:
        raise ValueError(f"positional encoding dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing="ij",
    )
    y = ys.flatten()[:, None] * freq[None]
    x = xs.flatten()[:, None] * freq[None]
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)


def sincos_position_encoding(grid: tuple[int, int], dim: int, like: Tensor) -> Tensor:
    """Fixed 2-D sine/cosine positional encoding (T, dim): no parameters, any grid size,
    so sites with different image sizes still share identical weights."""
    return _sincos(grid[0], grid[1], dim).to(device=like.device, dtype=like.dtype)
