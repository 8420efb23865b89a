"""Trainable modules that act on a backbone layer through a forward hook.

Each such module is attached as a child of the layer it modifies (``blocks.3.attn.qkv.ssf``) and
changes that layer's output in a forward hook. The backbone's own module tree and parameter
names stay exactly timm's, so pre-trained checkpoints, timm's forward code and a merged export
all keep working; the method's parameters are the only new names.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Attached(nn.Module):
    """Base of modules that live on a host layer (as child ``slot``) and act through its forward hook."""

    slot = "adapter"

    def attach(self, host: nn.Module) -> "Attached":
        if hasattr(host, self.slot):
            raise ValueError(f"{type(host).__name__} already has a {self.slot!r} attached")
        host.add_module(self.slot, self)
        # a bound method of a child module: deepcopy and pickling keep hook and module together
        host.register_forward_hook(self.hook)
        return self

    def detach(self, host: nn.Module) -> None:
        """Removes this module and its hook from ``host`` (after merging it into the host's weights)."""
        for key, fn in list(host._forward_hooks.items()):
            if getattr(fn, "__self__", None) is self:
                del host._forward_hooks[key]
        delattr(host, self.slot)

    def hook(self, host: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def attached(model: nn.Module, kind: type[Attached]) -> list[tuple[nn.Module, Attached]]:
    """(host, module) of every ``kind`` module attached in ``model``."""
    pairs = []
    for host in model.modules():
        child = host._modules.get(kind.slot)
        if isinstance(child, kind):
            pairs.append((host, child))
    return pairs


def output_channels(host: nn.Module) -> int:
    """Channels of a layer's output: Linear ``out_features``, conv ``out_channels``, norm features."""
    for attr in ("out_features", "out_channels", "num_features", "normalized_shape"):
        value = getattr(host, attr, None)
        if value is not None:
            return int(value[0] if isinstance(value, (tuple, list, torch.Size)) else value)
    raise TypeError(f"cannot tell the output channels of {type(host).__name__}")


class ScaleShift(Attached):
    """SSF: ``y = gamma * y + beta`` per output channel, gamma ~ N(1, 0.02), beta ~ N(0, 0.02).

    Args:
        channels: output channels of the host.
        channel_dim: where channels sit in the host's output (-1 for tokens, 1 for NCHW maps).
    """

    slot = "ssf"

    def __init__(self, channels: int, channel_dim: int = -1) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.empty(channels))
        self.shift = nn.Parameter(torch.empty(channels))
        nn.init.normal_(self.scale, mean=1.0, std=0.02)
        nn.init.normal_(self.shift, std=0.02)

    def hook(self, host: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        shape = [1] * output.ndim
        shape[self.channel_dim] = -1
        return output * self.scale.view(shape) + self.shift.view(shape)

    @torch.no_grad()
    def merge_into(self, host: nn.Module) -> None:
        """Folds the scale and shift into the host's weight and bias (Linear, conv, LayerNorm, BatchNorm)."""
        if getattr(host, "bias", None) is None:
            raise ValueError(f"cannot merge SSF into a {type(host).__name__} without a bias")
        weight = host.weight
        weight.mul_(self.scale.to(weight.dtype).view(-1, *([1] * (weight.ndim - 1))))
        host.bias.mul_(self.scale.to(host.bias.dtype)).add_(self.shift.to(host.bias.dtype))


class Bottleneck(Attached):
    """A bottleneck adapter ``s * up(dropout(act(down(z))))`` added to its host's output.

    ``z`` is the host's output (``sequential``: Houlsby, Pfeiffer) or its input (``parallel``).
    AdaptFormer's adapter is attached with :meth:`attach_beside` instead. ``up`` starts at zero,
    so the host is unchanged at initialisation.
    """

    slot = "adapter"

    def __init__(self, dim: int, bottleneck: int, scale: float, activation: str, parallel: bool,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        self.parallel = parallel
        self._pending: list[torch.Tensor] = []
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def branch(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(self.act(self.down(z))))

    def hook(self, host: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + self.branch(inputs[0] if self.parallel else output)

    def attach_beside(self, host: nn.Module, norm: nn.Module, residual: nn.Module, normed: bool) -> "Bottleneck":
        """AdaptFormer: lives on ``host`` (the MLP), reads what enters (or, ``normed``, leaves) the MLP's
        ``norm`` and is added to what ``residual`` (drop-path) adds to the stream, outside drop-path."""
        host.add_module(self.slot, self)
        norm.register_forward_hook(self.read_output if normed else self.read_input)
        residual.register_forward_hook(self.add_branch)
        return self

    def read_input(self, norm: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._pending[:] = [self.branch(inputs[0])]

    def read_output(self, norm: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._pending[:] = [self.branch(output)]

    def add_branch(self, residual: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        branch = self._pending.pop()  # computed by this forward's norm hook; not kept past it
        return output + branch.to(output.dtype)


class ParallelConv(Attached):
    """TSA: a 1x1 convolution beside a 3x3 convolution, ``y = conv3x3(x) + conv1x1(x)``, zero-initialised."""

    slot = "tsa"

    def __init__(self, host: nn.Conv2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(host.in_channels, host.out_channels, 1, stride=host.stride, bias=False)
        nn.init.zeros_(self.conv.weight)

    def hook(self, host: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + self.conv(inputs[0])

    @torch.no_grad()
    def merge_into(self, host: nn.Conv2d) -> None:
        """Adds the 1x1 kernel to the centre tap of the 3x3 kernel (same stride, padding 1)."""
        if host.kernel_size != (3, 3) or host.padding != (1, 1) or host.dilation != (1, 1) or host.groups != 1:
            raise ValueError("TSA merges only into 3x3 convolutions with padding 1, no dilation, no groups")
        host.weight[:, :, 1, 1] += self.conv.weight[:, :, 0, 0].to(host.weight.dtype)


class FactCore(Attached):
    """FacT-TT: a host Linear's update ``s * V(core(U(x)))`` with U (d->r) and V (r->d) shared by all layers.

    A host of ``a*d`` inputs and ``b*d`` outputs (qkv: 1 -> 3, fc1: 1 -> 4, fc2: 4 -> 1) gets an
    ``a*r x b*r`` core: its input is split into ``a`` slices of ``d`` that U projects, and the
    core's output into ``b`` slices of ``r`` that V lifts back.
    """

    slot = "fact"

    def __init__(self, host: nn.Linear, shared: "FactShared", scale: float, dropout: float) -> None:
        super().__init__()
        dim, rank = shared.dim, shared.rank
        if host.in_features % dim or host.out_features % dim:
            raise ValueError(f"FacT: a {host.in_features}->{host.out_features} layer is not a multiple of {dim}")
        self.ins, self.outs = host.in_features // dim, host.out_features // dim
        # nn.Linear's own initialisation (kaiming-uniform, a = sqrt(5)), as the reference's cores:
        # the reference's scales s then mean the same here
        self.core = nn.Linear(self.ins * rank, self.outs * rank, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        # a plain tuple, not a child: U and V are registered once, on the model root
        self._shared = (shared,)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        shared = self._shared[0]
        lead = x.shape[:-1]
        h = shared.u(x.reshape(*lead, self.ins, shared.dim)).reshape(*lead, self.ins * shared.rank)
        h = self.dropout(self.core(h)).reshape(*lead, self.outs, shared.rank)
        return self.scale * shared.v(h).reshape(*lead, self.outs * shared.dim)

    def hook(self, host: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + self.delta(inputs[0]).to(output.dtype)

    @torch.no_grad()
    def merge_into(self, host: nn.Linear) -> None:
        """The update is linear in x: its matrix is the update of the identity (run in eval mode)."""
        eye = torch.eye(host.in_features, device=host.weight.device, dtype=host.weight.dtype)
        host.weight += self.delta(eye).T


class FactShared(nn.Module):
    """FacT's U (d -> r) and V (r -> d), shared by every adapted layer; U keeps nn.Linear's own
    initialisation (as the reference's), V starts at zero."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.dim, self.rank = dim, rank
        self.u = nn.Linear(dim, rank, bias=False)
        self.v = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.v.weight)


def merge_attached(model: nn.Module, kind: type[Attached]) -> nn.Module:
    """Folds every ``kind`` module into its host (``merge_into``) and removes it."""
    was_training = model.training
    model.eval()  # dropout off while an update is read out
    for host, module in attached(model, kind):
        module.merge_into(host)  # type: ignore[attr-defined]
        module.detach(host)
    model.train(was_training)
    return model


class SplitQKV(nn.Module):
    """timm's fused qkv Linear as three Linears ``q``, ``k``, ``v`` whose outputs are concatenated."""

    def __init__(self, in_features: int, dim: int, bias: bool, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.q, self.k, self.v = (
            nn.utils.skip_init(nn.Linear, in_features, dim, bias=bias, device=device, dtype=dtype) for _ in range(3)
        )

    @classmethod
    def from_fused(cls, fused: nn.Linear) -> "SplitQKV":
        dim = fused.out_features // 3
        split = cls(fused.in_features, dim, fused.bias is not None, fused.weight.device, fused.weight.dtype)
        with torch.no_grad():
            for i, part in enumerate((split.q, split.k, split.v)):
                part.weight.copy_(fused.weight[i * dim : (i + 1) * dim])
                if fused.bias is not None:
                    part.bias.copy_(fused.bias[i * dim : (i + 1) * dim])
        split.requires_grad_(fused.weight.requires_grad)
        return split

    def fused(self) -> nn.Linear:
        parts = (self.q, self.k, self.v)
        fused = nn.utils.skip_init(
            nn.Linear, self.q.in_features, 3 * self.q.out_features, bias=self.q.bias is not None,
            device=self.q.weight.device, dtype=self.q.weight.dtype,
        )
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
        fused.requires_grad_(self.q.weight.requires_grad)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


class PromptTokens(nn.Module):
    """VPT prompts: ``prompts[0]`` enter after the first ``after`` tokens before the first block;
    deep VPT replaces those slots with ``prompts[i]`` before block ``i``."""

    def __init__(self, layers: int, tokens: int, dim: int, patch_area: int, after: int, dropout: float) -> None:
        super().__init__()
        self.after, self.tokens = after, tokens
        self.prompts = nn.Parameter(torch.empty(layers, tokens, dim))
        # VPT's initialisation: uniform with the fan of a patch embedding (3 x patch x patch + dim)
        bound = math.sqrt(6.0 / float(3 * patch_area + dim))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    def _prompts(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.prompts[layer]).to(x.dtype).expand(x.shape[0], -1, -1)

    def enter(self, block: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (torch.cat([x[:, : self.after], self._prompts(0, x), x[:, self.after :]], dim=1), *args[1:])

    def refresh(self, layer: int, block: nn.Module, args: tuple) -> tuple:
        x = args[0]
        rest = x[:, self.after + self.tokens :]
        return (torch.cat([x[:, : self.after], self._prompts(layer, x), rest], dim=1), *args[1:])


class Prefix(nn.Module):
    """Prefix tuning's learnable keys and values of one attention layer."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.key = nn.Parameter(torch.empty(tokens, dim))
        self.value = nn.Parameter(torch.empty(tokens, dim))
        nn.init.trunc_normal_(self.key, std=0.02)
        nn.init.trunc_normal_(self.value, std=0.02)


def _timm_attention() -> type:
    from timm.layers import Attention

    return Attention


class PrefixAttention(_timm_attention()):  # type: ignore[misc]
    """timm's Attention with the learnable key/value prefixes of ``self.prefix`` before the tokens' own.

    An attention module becomes one by a class change, so its state and names stay timm's.
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("prefix tuning does not support attention masks")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        def heads(p: torch.Tensor) -> torch.Tensor:  # (P, H*D) -> (B, H, P, D)
            return p.to(x.dtype).view(1, -1, self.num_heads, self.head_dim).transpose(1, 2).expand(B, -1, -1, -1)

        k = torch.cat([heads(self.prefix.key), k], dim=2)
        v = torch.cat([heads(self.prefix.value), v], dim=2)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def output_layer(module: nn.Module) -> nn.Module:
    """The last Linear or convolution of ``module`` (``module`` itself if it is one): what produces its output."""
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not layers:
        raise ValueError(f"{type(module).__name__} has no Linear or convolution to produce its output")
    return layers[-1]


class BranchScale(Attached):
    """DiffFit's gamma: ``y = gamma * y`` per output channel of a residual branch, gamma starting at 1.

    Args:
        channels: output channels of the host (the branch).
        channel_dim: where channels sit in the host's output (-1 for tokens, 1 for NCHW maps).
    """

    slot = "difffit"

    def __init__(self, channels: int, channel_dim: int = -1) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.gamma = nn.Parameter(torch.ones(channels))

    def hook(self, host: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        shape = [1] * output.ndim
        shape[self.channel_dim] = -1
        return output * self.gamma.view(shape).to(output.dtype)

    @torch.no_grad()
    def merge_into(self, host: nn.Module) -> None:
        """Scales the weight and bias of the host's output layer (only dropout may follow it)."""
        layer = output_layer(host)
        gamma = self.gamma.to(layer.weight.dtype)
        layer.weight.mul_(gamma.view(-1, *([1] * (layer.weight.ndim - 1))))
        if layer.bias is not None:
            layer.bias.mul_(gamma)


#: SVDs of frozen weights, by content: every trial of a warm executor copies the same pristine
#: backbone, so each weight is factorised once per worker, not once per trial
_SVD_CACHE: "OrderedDict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]" = OrderedDict()
#: factorisations kept (a ViT-B's 48 adapted layers, a U-Net's attention and feed-forward layers)
SVD_CACHE_SIZE = 256


def frozen_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)`` of a frozen weight, computed once per content.

    The key is the matrix's bytes' SHA-256 (with its shape, dtype and device), so only an
    identical weight shares a factorisation; each caller gets its own copies.
    """
    if matrix.device.type == "meta":  # shapes only (parameter counts): nothing to compute or keep
        return torch.linalg.svd(matrix, full_matrices=False)  # type: ignore[return-value]
    key = (tuple(matrix.shape), str(matrix.dtype), str(matrix.device),
           hashlib.sha256(matrix.detach().contiguous().cpu().numpy().tobytes()).hexdigest())
    if key not in _SVD_CACHE:
        _SVD_CACHE[key] = torch.linalg.svd(matrix, full_matrices=False)
        while len(_SVD_CACHE) > SVD_CACHE_SIZE:
            _SVD_CACHE.popitem(last=False)
    _SVD_CACHE.move_to_end(key)
    return tuple(t.clone() for t in _SVD_CACHE[key])  # type: ignore[return-value]


class SingularShift(Attached):
    """SVDiff: a layer's weight ``W = U diag(s) V^T`` becomes ``U diag(relu(s + delta)) V^T``, delta starting at 0.

    U, s and V^T are taken from the host's weight when attached (not saved: they are the frozen
    weight's, recomputed from it); the hook adds ``x -> layer(x; U diag(relu(s + delta) - s) V^T)``
    to the host's output, which is exactly zero while delta is. A convolution's kernel is
    factorised as a (out, in * kh * kw) matrix, as in the reference (mkshing/svdiff-pytorch).
    """

    slot = "svdiff"

    def __init__(self, host: nn.Module) -> None:
        super().__init__()
        if not isinstance(host, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TypeError(f"SVDiff shifts the singular values of a Linear or convolution, not a {type(host).__name__}")
        u, s, vh = frozen_svd(host.weight.detach().reshape(host.weight.shape[0], -1).float())
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("s", s, persistent=False)
        self.register_buffer("vh", vh, persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(s))
        self._shape = tuple(host.weight.shape)

    def delta_weight(self) -> torch.Tensor:
        shifted = F.relu(self.s + self.delta) - self.s
        return ((self.u * shifted) @ self.vh).reshape(self._shape)

    def hook(self, host: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        weight = self.delta_weight().to(output.dtype)
        if isinstance(host, nn.Linear):
            return output + F.linear(inputs[0], weight)
        return output + host._conv_forward(inputs[0], weight, None)

    @torch.no_grad()
    def merge_into(self, host: nn.Module) -> None:
        host.weight += self.delta_weight().to(host.weight.dtype)


def scale_branch(branch: nn.Module, channel_dim: int = -1) -> BranchScale:
    """Attaches DiffFit's per-channel gamma (1 at first) to the output of ``branch`` (a block's
    attention or MLP, a U-Net's attention or ResNet branch) and returns it."""
    channels = output_channels(output_layer(branch))
    return BranchScale(channels, channel_dim).to(output_layer(branch).weight.device).attach(branch)  # type: ignore[return-value]


def shift_singular_values(layer: nn.Module) -> SingularShift:
    """Attaches SVDiff's singular-value shifts (0 at first) to a Linear or convolution and returns them."""
    return SingularShift(layer).to(layer.weight.device).attach(layer)  # type: ignore[return-value]
