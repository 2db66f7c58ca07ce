"""Attention-with-KV-cache as people write it: plain torch functions, each noted with where it was seen.

The matcher in ``oscar_compile.passes.sites`` follows the graph (exact structural forms first, then masks, read
extents and write positions judged by evaluation) rather than comparing against these, so these functions are
its specification and its test corpus: ``tests/passes/test_patterns.py`` traces each
with Dynamo and checks that the pass rewrites it (``REWRITTEN``, outputs equal to the kernels' reference
``cache_attention_ref`` + ``append_kv_ref``) or reports it with the expected reason (``REPORTED``).

Common signature: ``q [B, Hq, T, D]``, caches ``[B, Hkv, S, D]``, new ``k``/``v`` ``[B, Hkv, T, D]``,
``pos [T]`` the positions written, ``causal [S, S]`` a lower-triangular bool buffer. GQA: ``Hq = 2 * Hkv``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["REWRITTEN", "REPORTED"]


def _repeat_kv(x, n):
    # transformers.models.llama.modeling_llama.repeat_kv (5.17-5.24)
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def gpt_fast(q, k_cache, v_cache, k, v, pos, causal):
    # gpt-fast model.py (KVCache.update + Attention.forward): index_put via setitem, repeat_interleave, SDPA
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    mask = causal[None, None, pos]
    keys = k_cache.repeat_interleave(2, dim=1)
    values = v_cache.repeat_interleave(2, dim=1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0)


def hf_static_sdpa(q, k_cache, v_cache, k, v, pos, causal):
    # transformers StaticLayer.update (index_copy_) + sdpa_attention_forward with repeat_kv and scale (5.17)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    mask = causal[None, None, pos]
    return F.scaled_dot_product_attention(
        q, _repeat_kv(k_cache, 2), _repeat_kv(v_cache, 2), attn_mask=mask, scale=0.125, dropout_p=0.0
    )


def hf_eager(q, k_cache, v_cache, k, v, pos, causal):
    # transformers eager_attention_forward: matmul * scaling + additive mask, fp32 softmax, dropout(p=0)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    mask = torch.where(causal[None, None, pos], 0.0, float("-inf"))
    scores = torch.matmul(q, _repeat_kv(k_cache, 2).transpose(2, 3)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=0.0, training=False)
    return torch.matmul(probs, _repeat_kv(v_cache, 2))


def masked_fill_decoder(q, k_cache, v_cache, k, v, pos, causal):
    # hand-written decoders (nanoGPT-style attention over a static cache): divide, masked_fill(-inf)
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    keys = k_cache.repeat_interleave(2, dim=1)
    scores = (q @ keys.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(causal[None, None, pos] == 0, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v_cache.repeat_interleave(2, dim=1)


def gemma2_eager(q, k_cache, v_cache, k, v, pos, causal):
    # transformers Gemma2 eager_attention_forward: scaling, tanh logit softcap, additive mask (Gemma2 caps at
    # 50.0; 2.0 here so the cap changes the result)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    scores = torch.matmul(q, _repeat_kv(k_cache, 2).transpose(2, 3)) * 0.125
    scores = torch.tanh(scores / 2.0) * 2.0
    scores = scores + torch.where(causal[None, None, pos], 0.0, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, _repeat_kv(v_cache, 2))


def prefill_is_causal(q, k_cache, v_cache, k, v, pos, causal):
    # transformers' prefill path: no mask, is_causal=True, native GQA, keys sliced to the prompt (5.24)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    t = q.shape[2]
    return F.scaled_dot_product_attention(q, k_cache[:, :, :t], v_cache[:, :, :t], is_causal=True, enable_gqa=True)


def alibi(q, k_cache, v_cache, k, v, pos, causal):
    # BLOOM/MPT-style ALiBi: a per-head linear distance bias added to the causal mask
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])[:, None, None]
    dist = (torch.arange(k_cache.shape[2])[None, :] - pos[:, None]).float()
    mask = torch.where(causal[None, None, pos], 0.0, float("-inf")) + slopes * dist
    return F.scaled_dot_product_attention(q, k_cache.repeat_interleave(2, 1), v_cache.repeat_interleave(2, 1), attn_mask=mask)


def fixed_prefix_window(q, k_cache, v_cache, k, v, pos, causal):
    # attention limited to a fixed prefix of the cache (e.g. a hard-coded context size): may hide tokens
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    mask = causal[None, None, pos, :48]
    return F.scaled_dot_product_attention(
        q, k_cache[:, :, :48].repeat_interleave(2, 1), v_cache[:, :, :48].repeat_interleave(2, 1), attn_mask=mask
    )


def transposed_view_write(q, k_cache, v_cache, k, v, pos, causal):
    # a [B, H, S, D] cache written through its [B, S, H, D] transpose along dim 1 (the write of Meta's llama
    # reference, whose cache is laid out [B, S, H, D]), with [B, T, H, D] new tokens
    k_cache.transpose(1, 2)[:, pos] = k.transpose(1, 2)
    v_cache.transpose(1, 2)[:, pos] = v.transpose(1, 2)
    mask = causal[None, None, pos]
    return F.scaled_dot_product_attention(q, k_cache.repeat_interleave(2, 1), v_cache.repeat_interleave(2, 1), attn_mask=mask)



def rows_first_mask(q, k_cache, v_cache, k, v, pos, causal):
    # gpt-fast with the mask's rows selected first, then unsqueezed (the measured form)
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    mask = causal[pos][None, None]
    return F.scaled_dot_product_attention(q, k_cache.repeat_interleave(2, 1), v_cache.repeat_interleave(2, 1), attn_mask=mask)


def index_select_additive_mask(q, k_cache, v_cache, k, v, pos, causal):
    # rows by index_select, made additive (0 / -inf) with where, caches written with index_copy_
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    mask = torch.where(causal.index_select(0, pos), 0.0, float("-inf")).unsqueeze(0).unsqueeze(0)
    return F.scaled_dot_product_attention(q, _repeat_kv(k_cache, 2), _repeat_kv(v_cache, 2), attn_mask=mask)


def ellipsis_write_float_tril(q, k_cache, v_cache, k, v, pos, causal):
    # k_cache[..., pos, :] = k; nanoGPT's float tril buffer compared with 0 in masked_fill
    k_cache[..., pos, :] = k
    v_cache[..., pos, :] = v
    tril = causal.float()[None, None]
    scores = (q @ k_cache.repeat_interleave(2, 1).transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(tril[:, :, pos, :] == 0, float("-inf"))
    return F.softmax(scores, dim=-1) @ v_cache.repeat_interleave(2, 1)


def future_key_mask(q, k_cache, v_cache, k, v, pos, causal):
    # each query also sees the next slot (an off-by-one mask): not causal
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    mask = torch.ones_like(causal).tril(1)[None, None, pos]
    return F.scaled_dot_product_attention(q, k_cache.repeat_interleave(2, 1), v_cache.repeat_interleave(2, 1), attn_mask=mask)


def written_slots_mask(q, k_cache, v_cache, k, v, pos, causal):
    # "attend to the slots holding something": a mask read from the cache contents, not from positions
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    filled = k_cache[:, :1].abs().sum(-1) != 0
    mask = filled[:, :, None, :] & causal[None, None, pos]
    return F.scaled_dot_product_attention(q, k_cache.repeat_interleave(2, 1), v_cache.repeat_interleave(2, 1), attn_mask=mask)


def qk_norm_after_read(q, k_cache, v_cache, k, v, pos, causal):
    # keys RMS-normalized after the cache read: the cache holds pre-norm keys
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    keys = k_cache * torch.rsqrt(k_cache.pow(2).mean(-1, keepdim=True) + 1e-6)
    mask = causal[None, None, pos]
    return F.scaled_dot_product_attention(q, keys.repeat_interleave(2, 1), v_cache.repeat_interleave(2, 1), attn_mask=mask)

REWRITTEN = {
    "gpt_fast": gpt_fast,
    "hf_static_sdpa": hf_static_sdpa,
    "hf_eager": hf_eager,
    "gemma2_eager": gemma2_eager,
    "masked_fill_decoder": masked_fill_decoder,
    "prefill_is_causal": prefill_is_causal,
    "transposed_view_write": transposed_view_write,
    "rows_first_mask": rows_first_mask,
    "index_select_additive_mask": index_select_additive_mask,
    "ellipsis_write_float_tril": ellipsis_write_float_tril,
}

# name -> (pattern, a substring of the reason the pass reports)
REPORTED = {
    "alibi": (alibi, "additive attention bias"),
    "fixed_prefix_window": (fixed_prefix_window, "prefix slice"),
    "future_key_mask": (future_key_mask, "a later position"),
    "written_slots_mask": (written_slots_mask, "cannot be checked by evaluation"),
    "qk_norm_after_read": (qk_norm_after_read, "normalized after the cache read"),
}
