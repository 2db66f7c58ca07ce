"""Small decoders written the ways people write KV caches (DESIGN §3), for the pass tests.

Every model's forward is ``forward(x, pos)``: ``x`` ``[B, T, dim]`` embeddings, ``pos`` ``[T]`` the positions
written this step. fp32, tiny shapes (head_dim 32 = one quantization group).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class StaticKVCache(nn.Module):
    """gpt-fast's KVCache: preallocated buffers written in place; ``update`` returns the whole buffers."""

    def __init__(self, batch, kv_heads, max_len, head_dim, write="setitem", dtype=torch.float32):
        super().__init__()
        self.write = write
        self.register_buffer("k_cache", torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype))

    def update(self, pos, k, v):
        # pos: [T]; k, v: [B, Hkv, T, D]
        if self.write == "setitem":  # gpt-fast: k_out[:, :, input_pos] = k_val (index_put)
            self.k_cache[:, :, pos] = k
            self.v_cache[:, :, pos] = v
        elif self.write == "index_copy_":  # transformers StaticLayer.update
            self.k_cache.index_copy_(2, pos, k)
            self.v_cache.index_copy_(2, pos, v)
        else:
            raise ValueError(self.write)
        return self.k_cache, self.v_cache


def repeat_kv(x, n_rep):
    # transformers' repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]
    b, h, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class Attention(nn.Module):
    """attn: "sdpa" (F.scaled_dot_product_attention) or "matmul" (matmul-scale-mask-softmax-matmul)."""

    def __init__(self, dim, heads, kv_heads, max_len, batch, attn="sdpa", write="setitem", gqa="repeat_interleave",
                 cache=None, alibi=False):  # fmt: skip
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attn, self.gqa, self.alibi = attn, gqa, alibi
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.kv_cache = cache if cache is not None else StaticKVCache(batch, kv_heads, max_len, self.head_dim, write)
        self.writes = cache is None  # a layer given another layer's cache only reads it
        if alibi:
            slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])
            self.register_buffer("slopes", slopes)

    def forward(self, x, mask, pos):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.writes:
            k, v = self.kv_cache.update(pos, k, v)
        else:
            k, v = self.kv_cache.k_cache, self.kv_cache.v_cache
        n_rep = self.heads // self.kv_heads
        if self.gqa == "repeat_interleave":
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        else:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        if self.alibi:  # additive position bias on top of the causal mask (ALiBi)
            dist = torch.arange(k.shape[2], device=x.device)[None, :] - pos[:, None]
            bias = self.slopes[:, None, None] * dist[None].float()
            mask = torch.where(mask, 0.0, float("-inf")) + bias[None]
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        else:
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~mask, float("-inf"))
            probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
            probs = F.dropout(probs, p=0.0, training=self.training)
            y = torch.matmul(probs, v)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class Decoder(nn.Module):
    """A stack of attention layers with residual connections; the causal mask is a buffer indexed by ``pos``."""

    def __init__(self, n_layers=2, dim=128, heads=4, kv_heads=2, max_len=128, batch=1, share_cache=False, **kw):
        super().__init__()
        layers = []
        for i in range(n_layers):
            cache = layers[0].kv_cache if share_cache and i > 0 else None
            layers.append(Attention(dim, heads, kv_heads, max_len, batch, cache=cache, **kw))
        self.layers = nn.ModuleList(layers)
        self.register_buffer("causal_mask", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, x, pos):
        mask = self.causal_mask[None, None, pos]  # gpt-fast: [1, 1, T, max_len]
        for layer in self.layers:
            x = x + layer(x, mask, pos)
        return x


class CatCacheDecoder(nn.Module):
    """Cache grown with torch.cat and kept as module attributes (a classic hand-written decoder)."""

    def __init__(self, dim=128, heads=4, batch=1):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.register_buffer("k_past", torch.zeros(batch, heads, 0, self.head_dim))
        self.register_buffer("v_past", torch.zeros(batch, heads, 0, self.head_dim))

    def forward(self, x, pos):
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k = torch.cat([self.k_past, k], dim=2)
        v = torch.cat([self.v_past, v], dim=2)
        self.k_past, self.v_past = k, v
        return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1).transpose(1, 2).reshape(b, t, -1)


class CrossAttentionDecoder(nn.Module):
    """Causal self-attention over a static cache, then cross-attention over a fixed encoder cache."""

    def __init__(self, dim=128, heads=4, max_len=128, enc_len=48, batch=1):
        super().__init__()
        self.self_attn = Attention(dim, heads, heads, max_len, batch)
        self.heads, self.head_dim = heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.register_buffer("enc_k", torch.randn(batch, heads, enc_len, self.head_dim))
        self.register_buffer("enc_v", torch.randn(batch, heads, enc_len, self.head_dim))
        self.register_buffer("causal_mask", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, x, pos):
        b, t, _ = x.shape
        x = x + self.self_attn(x, self.causal_mask[None, None, pos], pos)
        q = self.wq(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, self.enc_k, self.enc_v)
        return x + y.transpose(1, 2).reshape(b, t, -1)


class StackedCacheDecoder(nn.Module):
    """All layers' caches in one [L, B, H, S, D] buffer pair, each layer writing its slice ``k[i]``."""

    def __init__(self, n_layers=2, dim=128, heads=4, max_len=128, batch=1, bias_layer=None):
        super().__init__()
        self.heads, self.head_dim, self.bias_layer = heads, dim // heads, bias_layer
        self.qkv = nn.ModuleList([nn.Linear(dim, 3 * dim, bias=False) for _ in range(n_layers)])
        self.register_buffer("k", torch.zeros(n_layers, batch, heads, max_len, self.head_dim))
        self.register_buffer("v", torch.zeros(n_layers, batch, heads, max_len, self.head_dim))
        self.register_buffer("causal_mask", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, x, pos):
        b, t, _ = x.shape
        mask = self.causal_mask[None, None, pos]
        for i, proj in enumerate(self.qkv):
            q, k, v = proj(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            self.k[i][:, :, pos] = k
            self.v[i][:, :, pos] = v
            m = mask
            if i == self.bias_layer:  # an additive distance bias (ALiBi-like) on this layer only
                dist = (torch.arange(self.k.shape[3])[None, :] - pos[:, None]).float()
                m = torch.where(mask, 0.0, float("-inf")) + 0.1 * dist
            y = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=m)
            x = x + y.transpose(1, 2).reshape(b, t, -1)
        return x
