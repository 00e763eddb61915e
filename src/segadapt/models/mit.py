"""The Mix Transformer (MiT) encoder of SegFormer, as DAFormer uses it.

Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", NeurIPS 2021, Sec. 3.1: a hierarchical transformer without position
embeddings. Each of its four stages

- cuts the map into overlapping patches with a strided convolution (7x7 stride 4 for the
  first stage, 3x3 stride 2 after), followed by LayerNorm;
- runs pre-norm transformer blocks whose self-attention shrinks the keys and values by the
  stage's reduction ratio ``R`` (a ``R x R`` convolution with stride ``R`` and LayerNorm:
  "efficient self-attention", cost ``N^2 / R^2``), and whose feed-forward network carries a
  3x3 depth-wise convolution between its two linear layers ("Mix-FFN"), which gives the
  tokens their positional information;
- ends with a LayerNorm and returns the map: strides 4, 8, 16 and 32.

The module names and parameter shapes are those of the SegFormer/DAFormer code
(``patch_embed1..4``, ``block1..4``, ``norm1..4``), so SegFormer's ImageNet files
(``mit_b0.pth`` .. ``mit_b5.pth``) and DAFormer's checkpoints load without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import CheckpointableBlocks, run_block

BLOCK_NORM_EPS = 1e-6
"""LayerNorm epsilon in the blocks and after each stage (SegFormer's ``mit_b*`` presets); the
patch embeddings and the key/value reduction keep PyTorch's default 1e-5."""


@dataclass(frozen=True)
class MiTConfig:
    """The size of a Mix Transformer: per-stage widths, heads, depths and reduction ratios."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


_WIDE = (64, 128, 320, 512)

MIT_PRESETS: dict[str, MiTConfig] = {
    "mit_b0": MiTConfig(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "mit_b1": MiTConfig(embed_dims=_WIDE, depths=(2, 2, 2, 2)),
    "mit_b2": MiTConfig(embed_dims=_WIDE, depths=(3, 4, 6, 3)),
    "mit_b3": MiTConfig(embed_dims=_WIDE, depths=(3, 4, 18, 3)),
    "mit_b4": MiTConfig(embed_dims=_WIDE, depths=(3, 8, 27, 3)),
    "mit_b5": MiTConfig(embed_dims=_WIDE, depths=(3, 6, 40, 3)),
}
"""SegFormer's MiT-B0 .. MiT-B5 (Xie et al. 2021, Table 6 of the appendix)."""


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[N, h*w, C]`` tokens (row-major) -> ``[N, C, h, w]`` map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` map -> ``[N, h*w, C]`` tokens (row-major)."""
    return feature_map.flatten(2).transpose(1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples in training.

    Each sample's branch output is kept with probability ``1 - rate`` and then scaled by
    ``1 / (1 - rate)``, so its expectation is unchanged; in eval mode (or at rate 0) it is
    the identity.

    Examples:
        >>> drop = DropPath(0.5).train()
        >>> out = drop(torch.ones(1000, 3))
        >>> sorted(set(out[:, 0].tolist())), bool((out == out[:, :1]).all())
        ([0.0, 2.0], True)
        >>> bool((drop.eval()(torch.ones(4, 3)) == 1).all())
        True
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"


class OverlapPatchEmbed(nn.Module):
    """A strided convolution whose kernel overlaps its neighbours, then LayerNorm on the tokens.

    With ``padding = kernel // 2`` a side of ``n`` becomes ``ceil(n / stride)`` (7x7/4 and 3x3/2).
    """

    def __init__(self, in_channels: int, embed_dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``[N, C_in, H, W]`` -> tokens ``[N, h*w, D]`` and ``h, w``."""
        x = self.proj(x)
        return self.norm(map_to_tokens(x)), x.shape[2], x.shape[3]


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a map shrunk by ``sr_ratio``.

    Queries are computed for every token; for ``sr_ratio > 1`` the tokens are first laid out
    as their map, reduced by a ``sr_ratio x sr_ratio`` convolution of stride ``sr_ratio``
    (``sr``) and normalised (``norm``) before the keys and values (``kv``) are computed.
    Attention is ``softmax(q k^T / sqrt(d)) v`` per head (``d = dim / num_heads``), through
    :func:`torch.nn.functional.scaled_dot_product_attention`, then the output projection ``proj``.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[N, h*w, dim]`` tokens of an ``h x w`` map -> ``[N, h*w, dim]``."""
        batch, length, dim = tokens.shape
        source = tokens
        if self.sr_ratio > 1:
            source = self.norm(map_to_tokens(self.sr(tokens_to_map(tokens, height, width))))
        q = self._split_heads(self.q(tokens))
        k, v = (self._split_heads(part) for part in self.kv(source).chunk(2, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, L, dim]`` -> ``[N, heads, L, dim / heads]``."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)


class TokenDepthwiseConv(nn.Module):
    """A 3x3 depth-wise convolution (with bias) applied to tokens laid out as their map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return map_to_tokens(self.dwconv(tokens_to_map(tokens, height, width)))


class MixFFN(nn.Module):
    """Mix-FFN: ``fc2(GELU(dwconv3x3(fc1(x))))``, the convolution standing in for position embeddings."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = TokenDepthwiseConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(tokens), height, width)))


class MiTBlock(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, each branch under DropPath."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        tokens = tokens + self.drop_path(self.attn(self.norm1(tokens), height, width))
        return tokens + self.drop_path(self.mlp(self.norm2(tokens), height, width))


def stochastic_depth_rates(depths: tuple[int, ...], max_rate: float) -> list[list[float]]:
    """Per-stage, per-block drop-path rates rising linearly from 0 to ``max_rate`` over all blocks.

    Examples:
        >>> stochastic_depth_rates((2, 1), 0.1)
        [[0.0, 0.05], [0.1]]
    """
    total = sum(depths)
    rates = [max_rate * index / max(total - 1, 1) for index in range(total)]  # torch.linspace, in Python (meta device)
    starts = [sum(depths[:stage]) for stage in range(len(depths))]
    return [rates[start : start + depth] for start, depth in zip(starts, depths)]


def init_mit_weights(module: nn.Module) -> None:
    """SegFormer's initialisation of one module: truncated-normal (std 0.02) Linear weights,
    LayerNorm 1/0, convolutions ``N(0, sqrt(2 / fan_out))`` with ``fan_out = k*k*out/groups``,
    zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
    elif isinstance(module, nn.Conv2d):
        kernel_height, kernel_width = module.kernel_size
        fan_out = kernel_height * kernel_width * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
    else:
        return
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class MixTransformer(nn.Module, CheckpointableBlocks):
    """SegFormer's hierarchical Mix Transformer encoder (Xie et al., SegFormer, NeurIPS 2021).

    Args:
        variant: ``mit_b0`` .. ``mit_b5`` (:data:`MIT_PRESETS`), or a :class:`MiTConfig`.
        drop_path_rate: stochastic-depth rate of the last block; the rates rise linearly from
            0 over all blocks (0.1 in SegFormer and DAFormer).
        in_channels: input channels (3).

    Attributes:
        embed_dims: the channels ``C_1..C_4`` of the four returned maps.
        activation_checkpointing: recompute each transformer block in backward instead of keeping its
            activations (``train.activation_checkpointing``; :mod:`segadapt.models.checkpointing`).

    Shape:
        - input: ``[N, 3, H, W]``, already normalised
        - output: four maps ``[N, C_i, h_i, w_i]`` with ``h_1 = ceil(H / 4)`` and
          ``h_{i+1} = ceil(h_i / 2)`` (strides 4, 8, 16, 32), likewise for the width. The
          key/value reduction needs ``h_i, w_i >= sr_ratio_i``: sides of at least 29 pixels.

    Examples:
        >>> encoder = MixTransformer("mit_b0").eval()
        >>> [tuple(f.shape) for f in encoder(torch.rand(1, 3, 64, 97))]
        [(1, 32, 16, 25), (1, 64, 8, 13), (1, 160, 4, 7), (1, 256, 2, 4)]
    """

    def __init__(self, variant: str | MiTConfig = "mit_b5", drop_path_rate: float = 0.1, in_channels: int = 3) -> None:
        super().__init__()
        config = resolve_mit_config(variant)
        self.config = config
        self.embed_dims = config.embed_dims
        rates = stochastic_depth_rates(config.depths, drop_path_rate)
        channels = in_channels
        for stage, dim in enumerate(config.embed_dims):
            kernel, stride = (7, 4) if stage == 0 else (3, 2)
            self.add_module(f"patch_embed{stage + 1}", OverlapPatchEmbed(channels, dim, kernel, stride))
            blocks = [
                MiTBlock(dim, config.num_heads[stage], config.mlp_ratio, config.sr_ratios[stage], rate)
                for rate in rates[stage]
            ]
            self.add_module(f"block{stage + 1}", nn.ModuleList(blocks))
            self.add_module(f"norm{stage + 1}", nn.LayerNorm(dim, eps=BLOCK_NORM_EPS))
            channels = dim
        self.apply(init_mit_weights)

    def stage(self, index: int) -> tuple[OverlapPatchEmbed, nn.ModuleList, nn.LayerNorm]:
        """The patch embedding, blocks and final norm of stage ``index`` (1..4)."""
        return (
            cast(OverlapPatchEmbed, self.get_submodule(f"patch_embed{index}")),
            cast(nn.ModuleList, self.get_submodule(f"block{index}")),
            cast(nn.LayerNorm, self.get_submodule(f"norm{index}")),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check_size(x)
        maps = []
        for index in range(1, len(self.embed_dims) + 1):
            embed, blocks, norm = self.stage(index)
            tokens, height, width = embed(x)
            for block in blocks:
                tokens = run_block(block, tokens, height, width, checkpointed=self.activation_checkpointing)
            x = tokens_to_map(norm(tokens), height, width)
            maps.append(x)
        return maps

    def checkpointable_blocks(self) -> int:
        return sum(self.config.depths)

    def _check_size(self, x: torch.Tensor) -> None:
        height, width = x.shape[-2:]
        for stage, ratio in enumerate(self.config.sr_ratios):
            stride = 4 * 2**stage  # the stage's map has ceil(side / stride) pixels per side
            if min(-(-height // stride), -(-width // stride)) < ratio:
                raise ValueError(
                    f"input {height}x{width} is too small for the Mix Transformer: stage {stage + 1} (stride {stride})"
                    f" reduces keys and values by {ratio}, which needs sides of at least {stride * (ratio - 1) + 1} pixels"
                )


def resolve_mit_config(variant: str | MiTConfig) -> MiTConfig:
    """A :class:`MiTConfig` from itself or a preset name (``mit_b0`` .. ``mit_b5``)."""
    if isinstance(variant, MiTConfig):
        return variant
    if variant not in MIT_PRESETS:
        raise ValueError(f"unknown Mix Transformer {variant!r}; choose one of {', '.join(MIT_PRESETS)}")
    return MIT_PRESETS[variant]
