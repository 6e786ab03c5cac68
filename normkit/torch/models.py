"""Small reference models built from torch.nn's norm layers, for :func:`normkit.torch.benchmark`.

Each builder returns ``(model, example_inputs)``: a fresh model in training mode whose weights depend only on
``seed``, and a tuple of inputs for ``model(*example_inputs)``. ``quick=True`` gives a much smaller model and
batch (for tests and a fast look). The global random state is left as it was.

- ``resnet``: a ResNet-like CNN with BatchNorm2d; 32x3x112x112 images.
- ``unet``: a UNet-like stack of diffusers-style ResNet blocks with GroupNorm(32) + SiLU; 8x3x32x32 images.
- ``transformer``: a pre-LN transformer encoder with LayerNorm; 16x128 tokens, hidden 256, 4 heads, 4 layers.
- ``transformer_rms``: the same with ``nn.RMSNorm`` in place of every LayerNorm (LLaMA's norm).

``SmallCNN`` (not in ``MODELS``) is the small CNN with all three kinds of norm that ``examples/torch_cnn.py`` and
the tests train.

    from normkit.torch import benchmark
    from normkit.torch.models import MODELS
    model, inputs = MODELS["resnet"]()
    benchmark(model, inputs)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MODELS", "ResNet", "SmallCNN", "Transformer", "UNet", "resnet", "transformer", "transformer_rms", "unet"]


def _seeded(seed: int, build: Callable[[], tuple[nn.Module, tuple]]) -> tuple[nn.Module, tuple]:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    with torch.random.fork_rng(devices=[]):  # CPU generator only; the caller's state is restored on exit
        torch.manual_seed(seed)
        model, inputs = build()
    return model.train(), inputs


# --- resnet: BatchNorm2d ---------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the input (through a strided 1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """conv3x3/2-BN-ReLU stem, one stage of basic blocks per width (each stage after the first halves the
    resolution), global average pool, linear head."""

    def __init__(self, widths=(16, 32, 64, 128), blocks: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, stride=2 if i > 0 and j == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        y = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def resnet(quick: bool = False, seed: int = 0) -> tuple[nn.Module, tuple[Tensor]]:
    """ResNet-like CNN with BatchNorm2d: 32x3x112x112, widths 16, 32, 64, 128, two blocks each (ResNet-18's
    layout, narrower; 20 BatchNorm2d). Quick: 4x3x32x32, widths 8, 16, one block each."""
    if quick:
        return _seeded(seed, lambda: (ResNet(widths=(8, 16), blocks=1), (torch.randn(4, 3, 32, 32),)))
    return _seeded(seed, lambda: (ResNet(widths=(16, 32, 64, 128), blocks=2), (torch.randn(32, 3, 112, 112),)))


# --- unet: GroupNorm + SiLU ------------------------------------------------------------------------------------

class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without the time embedding: GN-SiLU-conv3x3-GN-SiLU-conv3x3, plus the input
    (through a 1x1 conv when the channel count changes)."""

    def __init__(self, cin: int, cout: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv1(F.silu(self.norm1(x)))
        y = self.conv2(F.silu(self.norm2(y)))
        return self.shortcut(x) + y


class UNet(nn.Module):
    """conv_in; a down path of ResNet blocks (a strided conv between levels); a middle block; an up path
    (nearest upsampling + conv between levels) whose blocks take the down path's outputs concatenated;
    GN-SiLU-conv_out. As diffusers' UNet2DModel, without attention and time embedding."""

    def __init__(self, widths=(64, 128), channels: int = 3, groups: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        cin = widths[0]
        for i, w in enumerate(widths):
            self.down.append(ResnetBlock(cin, w, groups))
            cin = w
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
        self.mid = ResnetBlock(cin, cin, groups)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            self.up.append(ResnetBlock(cin + w, w, groups))
            cin = w
            if i > 0:
                self.upsample.append(nn.Conv2d(w, w, 3, padding=1))
        self.norm_out = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1))
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def unet(quick: bool = False, seed: int = 0) -> tuple[nn.Module, tuple[Tensor]]:
    """UNet-like GroupNorm(32)+SiLU block stack: 8x3x32x32, widths 64, 128 (quick: 2x3x16x16, widths 32, 64)."""
    if quick:
        return _seeded(seed, lambda: (UNet(widths=(32, 64)), (torch.randn(2, 3, 16, 16),)))
    return _seeded(seed, lambda: (UNet(widths=(64, 128)), (torch.randn(8, 3, 32, 32),)))


# --- transformer: LayerNorm ------------------------------------------------------------------------------------

class EncoderLayer(nn.Module):
    """Pre-LN: x + attn(LN(x)), then x + mlp(LN(x)); attention by F.scaled_dot_product_attention.

    Written out rather than nn.TransformerEncoderLayer, whose inference fast path calls ATen's fused kernel
    with the LayerNorms' weights and never calls their forward (so a converted LayerNorm would not run there).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, norm=nn.LayerNorm):
        super().__init__()
        self.heads = heads
        self.norm1 = norm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = norm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Token and learned position embeddings, pre-LN encoder layers, a final LayerNorm (``norm``: the class of
    every norm layer, e.g. nn.RMSNorm); returns the hidden states (batch, tokens, dim)."""

    def __init__(self, vocab: int = 1000, dim: int = 256, heads: int = 4, layers: int = 4, max_len: int = 512,
                 norm=nn.LayerNorm):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) / math.sqrt(dim))
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, norm=norm) for _ in range(layers))
        self.norm = norm(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def transformer(quick: bool = False, seed: int = 0, norm=nn.LayerNorm) -> tuple[nn.Module, tuple[Tensor]]:
    """Pre-LN transformer encoder: 16x128 tokens, hidden 256, 4 heads, 4 layers (quick: 2x16 tokens, hidden 64,
    2 layers)."""
    if quick:
        return _seeded(seed, lambda: (Transformer(vocab=100, dim=64, heads=4, layers=2, norm=norm),
                                      (torch.randint(0, 100, (2, 16)),)))
    return _seeded(seed, lambda: (Transformer(vocab=1000, dim=256, heads=4, layers=4, norm=norm),
                                  (torch.randint(0, 1000, (16, 128)),)))


def transformer_rms(quick: bool = False, seed: int = 0) -> tuple[nn.Module, tuple[Tensor]]:
    """:func:`transformer` with nn.RMSNorm (eps None: machine epsilon, as in torch)."""
    return transformer(quick, seed, norm=nn.RMSNorm)


# --- SmallCNN: BatchNorm2d, GroupNorm and LayerNorm ---------------------------------------------------------

class SmallCNN(nn.Module):
    """conv + BatchNorm2d + ReLU blocks, a GroupNorm block, a LayerNorm head; for images (N, 3, H, W), any H, W."""

    def __init__(self, classes: int = 10):
        super().__init__()
        block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]  # noqa: E731
        self.features = nn.Sequential(*block(3, 16), *block(16, 32), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


#: name -> builder ``(quick=False, seed=0) -> (model, example_inputs)``
MODELS: dict[str, Callable[..., tuple[nn.Module, tuple]]] = {
    "resnet": resnet,
    "unet": unet,
    "transformer": transformer,
    "transformer_rms": transformer_rms,
}
