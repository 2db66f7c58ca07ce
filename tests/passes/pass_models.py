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
    """attn: "sdpa" (F.scaled_dot_product_attention), "matmul" (matmul-scale-masked_fill-softmax-matmul) or
    "where" (``torch.where(mask, scores, -inf)``, softmax in fp32, cast back)."""

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
            if self.attn == "where":
                scores = torch.where(mask, scores, float("-inf"))
                probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            else:
                scores = scores.masked_fill(~mask, float("-inf"))
                probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
            probs = F.dropout(probs, p=0.0, training=self.training)
            y = torch.matmul(probs, v)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class Decoder(nn.Module):
    """A stack of attention layers with residual connections; the causal mask is a buffer indexed by ``pos``.

    ``mask``: how the mask is spelled (all mean the same): "index" (gpt-fast: ``causal[None, None, pos]``),
    "rows_first" (``causal[pos][None, None]``), "unsqueeze" (``causal[pos].unsqueeze(0).unsqueeze(0)``),
    "index_select" (``causal.index_select(0, pos)[None, None]``), "additive" (``where(causal[pos], 0, -inf)``);
    or "window" (a sliding window of ``window`` keys, ``j > p - window``), "future" (each query also sees the
    next position: not causal).
    """

    def __init__(self, n_layers=2, dim=128, heads=4, kv_heads=2, max_len=128, batch=1, share_cache=False,
                 mask="index", window=None, **kw):  # fmt: skip
        super().__init__()
        layers = []
        for i in range(n_layers):
            cache = layers[0].kv_cache if share_cache and i > 0 else None
            layers.append(Attention(dim, heads, kv_heads, max_len, batch, cache=cache, **kw))
        self.layers = nn.ModuleList(layers)
        self.mask_style = mask
        causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))
        if mask == "window":
            causal &= ~torch.tril(torch.ones(max_len, max_len, dtype=torch.bool), diagonal=-window)
        elif mask == "future":
            causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal_mask", causal)

    def forward(self, x, pos):
        c = self.causal_mask
        if self.mask_style == "rows_first":
            mask = c[pos][None, None]
        elif self.mask_style == "unsqueeze":
            mask = c[pos].unsqueeze(0).unsqueeze(0)
        elif self.mask_style == "index_select":
            mask = c.index_select(0, pos)[None, None]
        elif self.mask_style == "additive":
            mask = torch.where(c[pos], 0.0, float("-inf"))[None, None]
        else:
            mask = c[None, None, pos]  # gpt-fast: [1, 1, T, max_len]
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


# ---------------------------------------------------------------------------------------------------
# the idioms of other code bases, written from their ideas (semantic matching corpus)


class LitGPTStyle(nn.Module):
    """litgpt's idea: fused qkv, a [1, 1, S, S] mask cache selected with ``index_select(2, pos)``, a KV cache
    module whose ``index_copy_`` returns the updated buffers, native GQA in SDPA (``enable_gqa``)."""

    class KVCache(nn.Module):
        def __init__(self, batch, kv_heads, max_len, head_dim):
            super().__init__()
            self.register_buffer("k", torch.zeros(batch, kv_heads, max_len, head_dim))
            self.register_buffer("v", torch.zeros(batch, kv_heads, max_len, head_dim))

        def forward(self, pos, k, v):
            return self.k.index_copy_(2, pos, k), self.v.index_copy_(2, pos, v)

    def __init__(self, n_layers=2, dim=128, heads=4, kv_heads=2, max_len=128, batch=1):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.qkv = nn.ModuleList([nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim) for _ in range(n_layers)])
        self.proj = nn.ModuleList([nn.Linear(dim, dim) for _ in range(n_layers)])
        self.caches = nn.ModuleList([self.KVCache(batch, kv_heads, max_len, self.head_dim) for _ in range(n_layers)])
        self.register_buffer("mask_cache", torch.ones(max_len, max_len, dtype=torch.bool).tril()[None, None])

    def forward(self, x, pos):
        b, t, _ = x.shape
        mask = self.mask_cache.index_select(2, pos)
        for qkv, proj, cache in zip(self.qkv, self.proj, self.caches):
            q, k, v = qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                    self.kv_heads * self.head_dim], dim=-1)  # fmt: skip
            q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            k, v = cache(pos, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim),
                                               enable_gqa=True)  # fmt: skip
            x = x + proj(y.transpose(1, 2).reshape(b, t, -1))
        return x


class NanoGPTStyle(nn.Module):
    """nanoGPT's idea with a static cache: ``c_attn`` split into q/k/v, a float ``tril`` buffer
    ``[1, 1, S, S]`` named ``bias``, ``masked_fill(bias[:, :, pos, :] == 0, -inf)``, plain multi-head attention."""

    def __init__(self, n_layers=2, dim=128, heads=4, max_len=128, batch=1):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.c_attn = nn.ModuleList([nn.Linear(dim, 3 * dim) for _ in range(n_layers)])
        self.c_proj = nn.ModuleList([nn.Linear(dim, dim) for _ in range(n_layers)])
        for i in range(n_layers):
            self.register_buffer(f"k_cache{i}", torch.zeros(batch, heads, max_len, dim // heads))
            self.register_buffer(f"v_cache{i}", torch.zeros(batch, heads, max_len, dim // heads))
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x, pos):
        b, t, c = x.shape
        for i, (attn, proj) in enumerate(zip(self.c_attn, self.c_proj)):
            q, k, v = attn(x).split(self.dim, dim=2)
            q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
            k_cache, v_cache = getattr(self, f"k_cache{i}"), getattr(self, f"v_cache{i}")
            k_cache[:, :, pos] = k
            v_cache[:, :, pos] = v
            att = (q @ k_cache.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, pos, :] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v_cache
            x = x + proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x


class TorchtuneStyle(nn.Module):
    """torchtune's idea: a KV cache module keeping its own position counter buffer (``cache_pos``, an arange
    it advances by the tokens written), writing ``k_cache[:, :, cache_pos[:T]] = k`` and returning the whole
    buffers; the model's additive mask (0 / -inf) comes from its own ``pos`` argument; GQA by
    ``unsqueeze(2).expand(...).flatten(1, 2)``."""

    class KVCache(nn.Module):
        def __init__(self, batch, kv_heads, max_len, head_dim):
            super().__init__()
            self.register_buffer("k_cache", torch.zeros(batch, kv_heads, max_len, head_dim))
            self.register_buffer("v_cache", torch.zeros(batch, kv_heads, max_len, head_dim))
            self.register_buffer("cache_pos", torch.arange(max_len))

        def update(self, k, v):
            t = k.shape[2]
            self.k_cache[:, :, self.cache_pos[:t]] = k
            self.v_cache[:, :, self.cache_pos[:t]] = v
            self.cache_pos.add_(t)
            return self.k_cache, self.v_cache

    def __init__(self, n_layers=2, dim=128, heads=4, kv_heads=2, max_len=128, batch=1):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.ModuleList([nn.Linear(dim, dim, bias=False) for _ in range(n_layers)])
        self.kv = nn.ModuleList([nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False) for _ in range(n_layers)])
        self.caches = nn.ModuleList([self.KVCache(batch, kv_heads, max_len, self.head_dim) for _ in range(n_layers)])
        causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))
        self.register_buffer("causal_bias", torch.zeros(max_len, max_len).masked_fill(~causal, float("-inf")))

    def forward(self, x, pos):
        b, t, _ = x.shape
        mask = self.causal_bias[pos][None, None]
        n = self.heads // self.kv_heads
        for wq, wkv, cache in zip(self.q, self.kv, self.caches):
            q = wq(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k, v = wkv(x).view(b, t, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
            k, v = cache.update(k, v)
            k = k.unsqueeze(2).expand(-1, -1, n, -1, -1).flatten(1, 2)
            v = v.unsqueeze(2).expand(-1, -1, n, -1, -1).flatten(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + y.transpose(1, 2).reshape(b, t, -1)
        return x


class MetaLlamaStyle(nn.Module):
    """Meta's reference Llama idea: ``forward(x, start_pos: int)``, caches laid out ``[B, S, Hkv, D]``, written
    ``cache_k[:bsz, start_pos:start_pos + T] = xk``, read as the prefix ``cache_k[:bsz, :start_pos + T]``,
    ``repeat_kv`` on the ``[B, S, H, D]`` layout, matmul attention; the prefill mask is built from
    ``triu(full(-inf))`` and zeros with ``hstack``, decode steps have no mask at all."""

    def __init__(self, n_layers=2, dim=128, heads=4, kv_heads=2, max_len=128, batch=1):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.ModuleList([nn.Linear(dim, dim, bias=False) for _ in range(n_layers)])
        self.wk = nn.ModuleList([nn.Linear(dim, kv_heads * self.head_dim, bias=False) for _ in range(n_layers)])
        self.wv = nn.ModuleList([nn.Linear(dim, kv_heads * self.head_dim, bias=False) for _ in range(n_layers)])
        for i in range(n_layers):
            self.register_buffer(f"cache_k{i}", torch.zeros(batch, max_len, kv_heads, self.head_dim))
            self.register_buffer(f"cache_v{i}", torch.zeros(batch, max_len, kv_heads, self.head_dim))

    @staticmethod
    def repeat_kv(x, n_rep):
        bs, slen, n_kv_heads, head_dim = x.shape
        if n_rep == 1:
            return x
        x = x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim)
        return x.reshape(bs, slen, n_kv_heads * n_rep, head_dim)

    def forward(self, x, start_pos: int):
        bsz, seqlen, _ = x.shape
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"), device=x.device)
            mask = torch.triu(mask, diagonal=1)
            mask = torch.hstack([torch.zeros((seqlen, start_pos), device=x.device), mask]).type_as(x)
        for i in range(len(self.wq)):
            cache_k, cache_v = getattr(self, f"cache_k{i}"), getattr(self, f"cache_v{i}")
            xq = self.wq[i](x).view(bsz, seqlen, self.heads, self.head_dim)
            xk = self.wk[i](x).view(bsz, seqlen, self.kv_heads, self.head_dim)
            xv = self.wv[i](x).view(bsz, seqlen, self.kv_heads, self.head_dim)
            cache_k[:bsz, start_pos : start_pos + seqlen] = xk
            cache_v[:bsz, start_pos : start_pos + seqlen] = xv
            keys = self.repeat_kv(cache_k[:bsz, : start_pos + seqlen], self.heads // self.kv_heads)
            values = self.repeat_kv(cache_v[:bsz, : start_pos + seqlen], self.heads // self.kv_heads)
            xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
            scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            scores = F.softmax(scores.float(), dim=-1).type_as(xq)
            out = torch.matmul(scores, values)
            x = x + out.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return x


class QKNormAfterRead(nn.Module):
    """Keys are RMS-normalized *after* the cache read: the cache holds pre-norm keys, so OScaR (which stores
    what attention consumes) cannot replace it."""

    def __init__(self, dim=128, heads=4, max_len=128, batch=1):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.k_norm = nn.Parameter(torch.ones(self.head_dim) * 1.5)
        self.register_buffer("k_cache", torch.zeros(batch, heads, max_len, self.head_dim))
        self.register_buffer("v_cache", torch.zeros(batch, heads, max_len, self.head_dim))
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, x, pos):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        self.k_cache[:, :, pos] = k
        self.v_cache[:, :, pos] = v
        keys = self.k_cache * torch.rsqrt(self.k_cache.pow(2).mean(-1, keepdim=True) + 1e-6) * self.k_norm
        y = F.scaled_dot_product_attention(q, keys, self.v_cache, attn_mask=self.causal[None, None, pos])
        return x + y.transpose(1, 2).reshape(b, t, -1)


class MLAStyle(nn.Module):
    """DeepSeek MLA's idea: the cache holds a compressed latent ``[B, S, r]`` (plus a small shared rotary key
    part) and keys/values are projected from it per head at attention time."""

    def __init__(self, dim=128, heads=4, latent=64, rope_dim=16, max_len=128, batch=1):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.w_down = nn.Linear(dim, latent + rope_dim, bias=False)
        self.w_uk = nn.Linear(latent, heads * (self.head_dim - rope_dim), bias=False)
        self.w_uv = nn.Linear(latent, dim, bias=False)
        self.latent, self.rope_dim = latent, rope_dim
        self.register_buffer("kv_latent", torch.zeros(batch, max_len, latent))
        self.register_buffer("k_rope", torch.zeros(batch, max_len, rope_dim))
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, x, pos):
        b, t, _ = x.shape
        s = self.kv_latent.shape[1]
        q = self.wq(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        c, r = self.w_down(x).split([self.latent, self.rope_dim], dim=-1)
        self.kv_latent[:, pos] = c
        self.k_rope[:, pos] = r
        k_nope = self.w_uk(self.kv_latent).view(b, s, self.heads, -1)
        k = torch.cat([k_nope, self.k_rope[:, :, None].expand(b, s, self.heads, self.rope_dim)], dim=-1).transpose(1, 2)
        v = self.w_uv(self.kv_latent).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.causal[None, None, pos])
        return x + y.transpose(1, 2).reshape(b, t, -1)


class IntStartDecoder(nn.Module):
    """A hand-written decoder called as ``forward(x, start: int)``: writes ``k_cache.narrow(2, start, T).copy_(k)``,
    reads the prefix ``k_cache[:, :, :start + T]`` (a length that grows every step), SDPA with ``is_causal`` for
    the prompt and no mask for single-token steps."""

    def __init__(self, n_layers=2, dim=128, heads=4, kv_heads=2, max_len=128, batch=1):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.ModuleList([nn.Linear(dim, dim, bias=False) for _ in range(n_layers)])
        self.wkv = nn.ModuleList([nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False) for _ in range(n_layers)])
        for i in range(n_layers):
            self.register_buffer(f"k{i}", torch.zeros(batch, kv_heads, max_len, self.head_dim))
            self.register_buffer(f"v{i}", torch.zeros(batch, kv_heads, max_len, self.head_dim))

    def forward(self, x, start: int):
        b, t, _ = x.shape
        for i in range(len(self.wq)):
            k_cache, v_cache = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            q = self.wq[i](x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k, v = self.wkv[i](x).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            k_cache.narrow(2, start, t).copy_(k)
            v_cache.narrow(2, start, t).copy_(v)
            y = F.scaled_dot_product_attention(q, k_cache[:, :, : start + t], v_cache[:, :, : start + t],
                                               is_causal=t > 1, enable_gqa=True)  # fmt: skip
            x = x + y.transpose(1, 2).reshape(b, t, -1)
        return x
