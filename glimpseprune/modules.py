"""The two learned parts GlimpsePrune adds to a frozen VLM: the glimpse token and the VIP.

Owns their architecture (method.md, "Parts"), their initialisation and the `ModulesSpec` that
fixes their sizes (and is saved beside their weights by glimpseprune.io). Must not touch the base
model: these modules take plain tensors (hidden sizes, attention logits, ViT features) and the
wrapper in glimpseprune.model wires them in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModulesSpec:
    """Sizes of the glimpse token and the VIP; everything needed to rebuild them empty."""

    text_hidden_size: int  # D of the decoder
    text_layers: int  # one glimpse vector per decoder layer
    text_heads: int  # H: VIP input 1 is [Nv, H] glimpse attention logits
    vision_hidden_size: int  # ViT width (before the merger)
    vit_layers: list[int]  # ViT blocks read by the VIP, deep to shallow (one VIP layer each)
    prune_layer: int  # K: layers 0..K see every token, the VIP reads layer K's attention
    vip_hidden_size: int = 256
    vip_head_dim: int = 64
    rms_norm_eps: float = 1e-6
    glimpse_dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (as in Qwen2), computed in float32."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GlimpseToken(nn.Module):
    """One learned vector per decoder layer, each through a shared Linear + RMSNorm (+ dropout).

    Layer 0's vector is the glimpse token's input embedding; layer i's (i > 0) is added to the
    residual stream at the glimpse position before layer i runs.
    """

    def __init__(self, spec: ModulesSpec):
        super().__init__()
        hidden = spec.text_hidden_size
        self.vectors_LD = nn.Parameter(torch.randn(spec.text_layers, hidden) * 0.02)
        self.proj = nn.Linear(hidden, hidden)
        self.norm = RMSNorm(hidden, spec.rms_norm_eps)
        self.dropout = nn.Dropout(spec.glimpse_dropout)

    def forward(self) -> torch.Tensor:
        """Returns [L, D]: the glimpse input of every decoder layer."""
        return self.dropout(self.norm(self.proj(self.vectors_LD)))


def rope_2d(x_NhE: torch.Tensor, rows_N: torch.Tensor, cols_N: torch.Tensor,
            base: float = 10000.0) -> torch.Tensor:
    """2D rotary embedding: the first half of each head rotates by row, the second by column.

    Args:
        x_NhE: [N, heads, E] queries or keys, E divisible by 4.
        rows_N, cols_N: [N] the token's (row, col) in its image's merged grid.
    """
    half = x_NhE.shape[-1] // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=x_NhE.device).float() / half))

    def rotate(part: torch.Tensor, pos_N: torch.Tensor) -> torch.Tensor:
        angles = pos_N.float()[:, None] * inv_freq[None]  # [N, half/2]
        cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None].to(part.dtype)
        sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None].to(part.dtype)
        first, second = part.chunk(2, dim=-1)
        return part * cos + torch.cat([-second, first], -1) * sin

    return torch.cat([rotate(x_NhE[..., :half], rows_N), rotate(x_NhE[..., half:], cols_N)], -1)


class VIPLayer(nn.Module):
    """Conditional self-attention (q, k from [x, ViT feature], v from x) + SwiGLU, pre-norm."""

    def __init__(self, spec: ModulesSpec):
        super().__init__()
        dim, eps = spec.vip_hidden_size, spec.rms_norm_eps
        self.heads = max(dim // spec.vip_head_dim, 1)
        self.feature_norm = RMSNorm(spec.vision_hidden_size, eps)
        self.feature_proj = nn.Linear(spec.vision_hidden_size, dim)
        self.attn_norm = RMSNorm(dim, eps)
        self.q_proj = nn.Linear(2 * dim, dim)
        self.k_proj = nn.Linear(2 * dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.mlp_norm = RMSNorm(dim, eps)
        self.gate_proj = nn.Linear(dim, 4 * dim, bias=False)
        self.up_proj = nn.Linear(dim, 4 * dim, bias=False)
        self.down_proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x_Nd: torch.Tensor, feature_NF: torch.Tensor, rows_N: torch.Tensor,
                cols_N: torch.Tensor, image_N: torch.Tensor) -> torch.Tensor:
        """One layer over a sample's visual tokens; attention stays inside each image."""
        n, dim = x_Nd.shape
        normed = self.attn_norm(x_Nd)
        cond = torch.cat([normed, self.feature_proj(self.feature_norm(feature_NF))], -1)
        q = rope_2d(self.q_proj(cond).view(n, self.heads, -1), rows_N, cols_N)
        k = rope_2d(self.k_proj(cond).view(n, self.heads, -1), rows_N, cols_N)
        v = self.v_proj(normed).view(n, self.heads, -1)
        same_image_NN = image_N[:, None] == image_N[None, :]
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=same_image_NN)
        x_Nd = x_Nd + self.o_proj(attn.transpose(0, 1).reshape(n, dim))
        normed = self.mlp_norm(x_Nd)
        return x_Nd + self.down_proj(F.silu(self.gate_proj(normed)) * self.up_proj(normed))


class VIP(nn.Module):
    """Visual-token importance predictor: glimpse attention + ViT features -> a logit per token."""

    def __init__(self, spec: ModulesSpec):
        super().__init__()
        self.in_proj = nn.Linear(spec.text_heads, spec.vip_hidden_size)
        self.layers = nn.ModuleList(VIPLayer(spec) for _ in spec.vit_layers)
        self.out_norm = RMSNorm(spec.vip_hidden_size, spec.rms_norm_eps)
        self.out_proj = nn.Linear(spec.vip_hidden_size, 1)
        # An untrained VIP starts near sigmoid = 0.5 for every token rather than at random
        # extremes: the keep rule then sees no confident decision it did not learn.
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, glimpse_logits_NH: torch.Tensor, features: list[torch.Tensor],
                rows_N: torch.Tensor, cols_N: torch.Tensor,
                image_N: torch.Tensor) -> torch.Tensor:
        """One sample's VIP logits.

        Args:
            glimpse_logits_NH: [N, H] raw glimpse-query attention logits over its visual keys.
            features: per VIP layer (deep to shallow), [N, F] ViT features pooled per merge unit.
            rows_N, cols_N: [N] each token's cell in its image's merged grid.
            image_N: [N] which of the sample's images the token belongs to.

        Returns:
            [N] vip_logits.
        """
        x_Nd = self.in_proj(glimpse_logits_NH.to(self.in_proj.weight.dtype))
        for layer, feature_NF in zip(self.layers, features, strict=True):
            x_Nd = layer(x_Nd, feature_NF.to(x_Nd.dtype), rows_N, cols_N, image_N)
        return self.out_proj(self.out_norm(x_Nd)).squeeze(-1)


class GlimpseModules(nn.Module):
    """The glimpse token and the VIP together: the only parameters stage 1 trains."""

    def __init__(self, spec: ModulesSpec):
        super().__init__()
        if not 0 <= spec.prune_layer < spec.text_layers:
            raise ValueError(f"prune_layer {spec.prune_layer} is outside the decoder's "
                             f"{spec.text_layers} layers")
        if spec.vip_hidden_size % spec.vip_head_dim and spec.vip_hidden_size > spec.vip_head_dim:
            raise ValueError(f"vip_hidden_size {spec.vip_hidden_size} is not a multiple of "
                             f"vip_head_dim {spec.vip_head_dim}")
        self.spec = spec
        self.glimpse_token = GlimpseToken(spec)
        self.vip = VIP(spec)
