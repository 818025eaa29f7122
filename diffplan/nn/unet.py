"""Temporal U-Net (Janner et al. 2022, "Planning with Diffusion for Flexible Behavior Synthesis").

Read top to bottom: config, the channels-last building blocks, then the network.

The architecture is Janner's: residual temporal blocks of two (Conv1d k=5, GroupNorm, Mish)
layers with the noise-level embedding added after the first one (or, with ``film=True``,
a FiLM scale/shift as in Chi et al.'s Diffusion Policy), a 1x1 residual convolution,
stride-2 down-sampling, up-sampling with skip connections, and a final conv block.

Implementation choices, for speed on CPU (batch-1 planning and batch-32 training); none
changes the function class:

* Activations are ``(B, C, 1, H)`` tensors in channels-last memory, i.e. exactly the memory
  of a ``(B, H, C)`` trajectory, so the input and output are zero-copy views. Convolutions
  run as ``conv2d`` with ``(1, k)`` kernels on the NHWC kernels. Measured on a 2-core EPYC,
  one thread: a k=5 conv at batch 1 and ``H`` = 4..32 is 2 to 6 times faster than ``conv1d``
  on ``(B, C, H)`` (whose GEMM ``(C_out, C k) @ (C k, H)`` is very thin at small ``H``), and
  the horizon must be the *width* axis: the same conv with ``(k, 1)`` kernels along the
  height is 2 to 4 times slower, in training as well. GroupNorm, Mish, the embedding add and
  the skip ``cat`` all keep the layout: no layout copies anywhere.
* Conv weights are stored as ``(C_out, k, 1, C_in)``: the ``(C_out, C_in, 1, k)`` kernel's
  channels-last memory (``k`` and the size-1 axis swapped), so one ``permute`` gives the kernel
  its native layout while the parameter itself stays contiguous (plain ``state_dict`` /
  safetensors).
* The noise-level embedding's projections for every residual block are one ``Linear``
  (``Mish(e) @ W_all``), split into per-block views once per forward; GroupNorm calls the
  ATen op directly; with ``cond=None`` no condition work is done.

* On CPU, batches of 2 and 3 of a U-Net with ``dim * H <= 2048`` run their convolutions on
  PyTorch's native (im2col + GEMM) path, the one it already takes at batch 1: above batch 1
  PyTorch hands the convs to oneDNN, which is slow for the narrow activations of such nets.
  Measured on the 2-core EPYC, one thread (process CPU time, U-Net forward): a 4-level U-Net
  at H=32 takes 1.9-2.6 ms at batch 1 and 4.8-6.2 ms at batch 2; the native path costs 0.65-0.76x
  of oneDNN's at batch 2 and 0.75-0.87x at batch 3 for nets with ``dim * H`` = 1024-1536, but
  1.01x / 1.14x for the umaze U-Net (``dim * H`` = 4096), and from batch 4 on it loses (1.6x at 4,
  8-10x at 16-64). ``dim * H`` is the per-sample size of every level's activation (channels
  double as the width halves). Results agree with the oneDNN path to float rounding (~2e-6).

The horizon must be divisible by ``2 ** (len(dim_mults) - 1)``: the network raises a
``ValueError`` naming the valid multiple rather than padding silently (padding would make
the inpainted end of a plan sit at an index the model never saw in training).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import TimeCondEmbedding


# CPU batch sizes, and the largest dim * H, whose convolutions skip oneDNN (module docstring;
# benchmarks/cpu_batch_path.py).
NATIVE_CONV_BATCHES = frozenset({2, 3})
NATIVE_CONV_MAX_SIZE = 2048


@dataclass
class TemporalUNetConfig:
    transition_dim: int
    dim: int = 32
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    cond_dim: int = 0
    kernel_size: int = 5
    groups: int = 8
    film: bool = False
    attention: bool = False


class Conv(nn.Module):
    """``nn.Conv1d`` along the horizon (the width axis) of a channels-last ``(B, C, 1, H)`` activation.

    ``transposed=True`` gives ``nn.ConvTranspose1d`` (Janner's up-sampling). Initialisation
    is PyTorch's default for the corresponding conv (fan-in ``k * C_in``, resp. ``k * C_out``).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, stride: int = 1, padding: int | None = None,
                 transposed: bool = False):
        super().__init__()
        self.stride = (1, stride)
        self.padding = (0, kernel_size // 2 if padding is None else padding)
        self.transposed = transposed
        shape = (c_in, kernel_size, 1, c_out) if transposed else (c_out, kernel_size, 1, c_in)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(c_out))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(shape[1] * shape[3])
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.permute(0, 3, 2, 1)  # channels-last view of the (out, in, 1, k) kernel
        if self.transposed:
            return F.conv_transpose2d(x, w, self.bias, self.stride, self.padding)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` calling the ATen op directly (``F.group_norm``'s Python checks cost more than
    the kernel at batch 1); works on the channels-last activation as is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class ConvBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish (Janner's ``Conv1dBlock``); used for the output head."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, groups: int):
        super().__init__()
        self.conv = Conv(c_in, c_out, kernel_size)
        self.norm = GroupNorm(groups, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mish(self.norm(self.conv(x)))


class ResidualBlock(nn.Module):
    """Janner's ``ResidualTemporalBlock``: two (conv, GroupNorm, Mish) layers, the embedding
    entering after the first (added, or FiLM ``scale * h + shift``), plus a residual path."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, groups: int, film: bool):
        super().__init__()
        self.conv1, self.norm1 = Conv(c_in, c_out, kernel_size), GroupNorm(groups, c_out)
        self.conv2, self.norm2 = Conv(c_out, c_out, kernel_size), GroupNorm(groups, c_out)
        self.residual = Conv(c_in, c_out, 1) if c_in != c_out else None
        self.film = film
        self.emb_channels = 2 * c_out if film else c_out  # this block's slice of the embedding projection

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.mish(self.norm1(self.conv1(x)))
        if self.film:
            scale, shift = emb.chunk(2, dim=1)
            h = torch.addcmul(shift, h, scale)
        else:
            h = h + emb
        h = F.mish(self.norm2(self.conv2(h)))
        return h + (x if self.residual is None else self.residual(x))


class LinearAttention(nn.Module):
    """Pre-norm residual linear attention over the horizon (Shen et al. 2021; as in Janner's ``attention=True``)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x = x_in.flatten(2).transpose(1, 2)  # (B, H, C) view of the channels-last activation
        B, H, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).view(B, H, 3, self.heads, self.dim_head).unbind(2)  # (B, H, heads, d)
        q = q.softmax(dim=-1) * self.dim_head**-0.5  # over features
        k = k.softmax(dim=1)  # over positions
        context = torch.einsum("bnhd,bnhe->bhde", k, v)
        out = torch.einsum("bhde,bnhd->bnhe", context, q).reshape(B, H, -1)
        return (x + self.to_out(out)).transpose(1, 2).reshape(x_in.shape)


class TemporalUNet(nn.Module):
    """``forward(x (B, H, D), t (B,) in [0, 1], cond (B, C) | None) -> (B, H, D)``.

    ``TemporalUNet(transition_dim, dim=32, dim_mults=(1, 2, 4, 8), cond_dim=0, kernel_size=5,
    groups=8, film=False, attention=False)``, or ``TemporalUNet(config=TemporalUNetConfig(...))``.
    """

    def __init__(self, transition_dim: int | None = None, dim: int = 32, dim_mults=(1, 2, 4, 8), cond_dim: int = 0,
                 kernel_size: int = 5, groups: int = 8, film: bool = False, attention: bool = False,
                 config: TemporalUNetConfig | None = None):
        super().__init__()
        if config is None:
            config = TemporalUNetConfig(transition_dim, dim, tuple(dim_mults), cond_dim, kernel_size, groups, film, attention)
        self.config = c = config
        dims = [c.transition_dim] + [c.dim * m for m in c.dim_mults]
        in_out = list(itertools.pairwise(dims))
        self.horizon_multiple = 2 ** (len(c.dim_mults) - 1)

        def block(c_in, c_out):
            return ResidualBlock(c_in, c_out, c.kernel_size, c.groups, c.film)

        def attn(ch):
            return LinearAttention(ch) if c.attention else None

        self.embed = TimeCondEmbedding(c.dim, cond_dim=c.cond_dim)
        self.downs = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                block(c_in, c_out), block(c_out, c_out), attn(c_out),
                None if last else Conv(c_out, c_out, 3, stride=2, padding=1),
            ]))
        mid = dims[-1]
        self.mid = nn.ModuleList([block(mid, mid), attn(mid), block(mid, mid)])  # attn may be None
        self.ups = nn.ModuleList()
        for c_in, c_out in reversed(in_out[1:]):  # as in Janner's code, the first level's skip goes unused
            self.ups.append(nn.ModuleList([
                block(2 * c_out, c_in), block(c_in, c_in), attn(c_in),
                Conv(c_in, c_in, 4, stride=2, padding=1, transposed=True),
            ]))
        self.final_block = ConvBlock(c.dim, c.dim, c.kernel_size, c.groups)
        self.final_conv = Conv(c.dim, c.transition_dim, 1)

        # One projection of Mish(embedding) for all residual blocks, in forward order.
        blocks = [m for m in self.modules() if isinstance(m, ResidualBlock)]
        self.emb_splits = [b.emb_channels for b in blocks]
        self.emb_proj = nn.Linear(c.dim, sum(self.emb_splits))
        if c.film:  # scale starts at 1 so that FiLM starts near the identity
            with torch.no_grad():
                offset = 0
                for n in self.emb_splits:
                    self.emb_proj.bias[offset: offset + n // 2] += 1.0
                    offset += n

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if (x.shape[0] in NATIVE_CONV_BATCHES and self.config.dim * x.shape[1] <= NATIVE_CONV_MAX_SIZE
                and x.device.type == "cpu" and torch._C._get_mkldnn_enabled() and not torch.compiler.is_compiling()):
            torch._C._set_mkldnn_enabled(False)  # the conv backend per batch size (module docstring)
            try:
                return self._forward(x, t, cond)
            finally:
                torch._C._set_mkldnn_enabled(True)
        return self._forward(x, t, cond)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if x.shape[1] % self.horizon_multiple:
            H, m = x.shape[1], self.horizon_multiple
            raise ValueError(f"TemporalUNet: horizon {H} is not a multiple of {m} (= 2**(len(dim_mults)-1) for "
                             f"dim_mults={self.config.dim_mults}); use e.g. horizon {m * max(1, round(H / m))}")
        emb = self.emb_proj(F.mish(self.embed(t, cond)))[:, :, None, None].split(self.emb_splits, dim=1)
        emb = iter(emb)
        x = x.contiguous().transpose(1, 2).unsqueeze(2)  # (B, D, 1, H) in channels-last memory: a view of x

        skips = []
        for block1, block2, attn, down in self.downs:
            x = block2(block1(x, next(emb)), next(emb))
            if attn is not None:
                x = attn(x)
            skips.append(x)
            if down is not None:
                x = down(x)
        block1, attn, block2 = self.mid
        x = block1(x, next(emb))
        if attn is not None:
            x = attn(x)
        x = block2(x, next(emb))
        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat((x, skips.pop()), dim=1), next(emb))
            x = block2(x, next(emb))
            if attn is not None:
                x = attn(x)
            x = up(x)
        return self.final_conv(self.final_block(x)).squeeze(2).transpose(1, 2)
