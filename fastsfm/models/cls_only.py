"""The last transformer block computed for the class token only, where the features are that token.

A ViT whose features are its class token (timm's ``global_pool="token"``, no attention pooling:
DINOv2, CLIP, MoCo-v3, DINO) reads nothing of the last block's output but token 0, so the last
block needs the keys and values of every token but the query, the attention output, the
projection and the MLP of token 0 only -- about 7 % of a ViT-B/14's FLOPs at 224 px saved, the
same numbers (the rows of an attention are independent: equal to the full block in float64,
``tests/models/test_backbones.py``).  The block's ``forward`` is replaced on the instance (its modules
and state dict are untouched), and only for timm's standard ``Block`` with timm's standard
``Attention`` in eval mode; anything else keeps the full block.
"""

from __future__ import annotations

import types

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["use_cls_only_last_block"]


def _cls_forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """``Block.forward`` for token 0 only: (B, N, C) -> (B, 1, C)."""
    if attn_mask is not None or is_causal or self.training:
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    attn = self.attn
    y = self.norm1(x)
    batch, tokens, _ = y.shape
    qkv = attn.qkv(y).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q[:, :, :1]), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (B, heads, 1, head_dim)
    out = attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, 1, attn.num_heads * attn.head_dim)))
    first = x[:, :1] + self.drop_path1(self.ls1(out))
    return first + self.drop_path2(self.ls2(self.mlp(self.norm2(first))))


def use_cls_only_last_block(model: nn.Module) -> bool:
    """Compute ``model``'s last block for the class token only when that is exact (module docstring);
    return whether it was done."""
    try:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError:  # another timm layout: keep the full block
        return False
    if not isinstance(model, VisionTransformer) or model.global_pool != "token" or model.attn_pool is not None:
        return False
    last = model.blocks[-1] if len(model.blocks) else None
    if type(last) is not Block or type(getattr(last, "attn", None)) is not Attention:
        return False
    if getattr(last.attn, "gate", None) is not None or not hasattr(last.attn, "head_dim"):
        return False
    last.forward = types.MethodType(_cls_forward, last)
    return True
