"""Data-free, per-head choice of the key transform (rotate? scale by the token norm?) — the "auto" default.

Why: measured on trained models (DESIGN.md §2.8), Hadamard-rotating keys helps some models (SmolLM2) and
badly hurts others (Qwen2.5, whose QKV bias gives a few key channels ~15x the median magnitude: per-channel
quantization isolates them, a rotation smears them over every channel). No fixed setting is right
everywhere, so the cache decides per layer and per kv head from the keys it is about to quantize.

Rule (``choose_key_flags``): for each candidate (rotate in {no, yes}) x (scale in {no, yes}) allowed by
the config, quantize/dequantize the keys exactly as the cache would (same groups, same fp16 parameters)
and measure, per kv head, the relative error of what attention computes from them:

* with queries (the default path: the prompt's latest ``NUM_QUERIES`` queries, which attend to the whole
  prompt): the attention-logit error with each query's mean removed (softmax ignores a constant shift),
  ``|| C(Q_h (K_h - K̂_h)^T) ||² / || C(Q_h K_h^T) ||²`` over the query heads sharing kv head ``h``;
* without queries: the keys' relative reconstruction error ``||K_h - K̂_h||² / ||K_h||²`` (a weaker proxy).

Each head takes the candidate with the smallest error; exact ties go to the earlier candidate in
``CANDIDATES`` order. The result is a deterministic function of the inputs (fp32, no randomness).

Evidence (benchmarks/README.md, "Accuracy"): against the attention-output error over a 1K prompt, the
query rule restricted to scale=on beats the best fixed choice on both SmolLM2 (0.110 vs 0.126) and
Qwen2.5 (0.117 vs 0.125); end to end (``OScaRConfig.adaptive()``, continuation perplexity) it is within
0.3 points of the best 2-bit variant on both models at 1K and 4K. The keys-only proxy is clearly worse
(SmolLM2 1K: +6.5% perplexity vs +3.7% with queries): pass the prompt's queries.

Only complete groups of ``group_size`` tokens are scored (the first ``max_tokens``); with fewer than one
group the fallback flags are returned. Cost: one quantize/dequantize of the scored keys per candidate and
two ``[Nq, T]`` logit products per head; measured in benchmarks/README.md.
"""

from __future__ import annotations

import torch

from .hadamard import hadamard_transform
from .quantization import dequantize_groups, key_token_norms, quantize_groups

__all__ = ["CANDIDATES", "FALLBACK_FLAGS", "allowed_candidates", "choose_key_flags", "key_transform_errors"]

# (rotate, scale) candidates, in tie-break order.
CANDIDATES: tuple[tuple[bool, bool], ...] = ((False, True), (True, True), (False, False), (True, False))
# Used when fewer than one complete group of tokens is available.
FALLBACK_FLAGS: tuple[bool, bool] = (False, True)
MAX_TOKENS = 1024  # keys scored at most (the first ones): bounds the cost on long prompts
NUM_QUERIES = 64  # latest queries used (they attend to the whole prompt)


def _roundtrip(k: torch.Tensor, norms: torch.Tensor, bits: int, group_size: int, rotate: bool, scale: bool):
    # k: [B, H, T, D] fp32 -> what the cache would return for it with these flags on every head (the same
    # operations as quantization.quantize_keys/dequantize_keys, without packing the codes).
    b, h, t, d = k.shape
    x = hadamard_transform(k) if rotate else k
    if scale:
        x = x / norms
    codes, mn, step = quantize_groups(x.reshape(b, h, t // group_size, group_size, d), bits, dim=3)
    x = dequantize_groups(codes, mn, step).reshape(b, h, t, d)
    if scale:
        x = x * norms
    return hadamard_transform(x) if rotate else x


def key_transform_errors(
    keys: torch.Tensor,
    bits: int,
    group_size: int,
    queries: torch.Tensor | None = None,
    max_tokens: int = MAX_TOKENS,
    num_queries: int = NUM_QUERIES,
    candidates=CANDIDATES,
) -> torch.Tensor:
    """Relative error ``[len(candidates), Hkv]`` (fp32) of each candidate on each kv head.

    keys: ``[B, Hkv, T, D]``, T >= group_size (the first ``max_tokens`` complete groups are scored).
    queries: ``[B, Hq, Tq, D]`` with Hq a multiple of Hkv (query heads ``h * Hq/Hkv .. (h+1) * Hq/Hkv - 1``
    read kv head ``h``); the last ``num_queries`` are used. Without queries the error is the keys' own
    relative reconstruction error ``||K - K̂||² / ||K||²``.
    """
    b, h, t, d = keys.shape
    n = min(t, max_tokens) // group_size * group_size
    if n == 0:
        raise ValueError(f"need at least group_size={group_size} tokens, got keys {tuple(keys.shape)}")
    k = keys[:, :, :n].to(torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    if queries is not None:
        if queries.dim() != 4 or queries.shape[0] != b or queries.shape[-1] != d or queries.shape[1] % h:
            raise ValueError(
                f"queries must be [B, Hq, Tq, D] with Hq a multiple of Hkv={h}; got {tuple(queries.shape)} "
                f"for keys {tuple(keys.shape)}"
            )
        rep, nq = queries.shape[1] // h, min(queries.shape[2], num_queries)
        q = queries[:, :, -nq:].to(torch.float32).reshape(b, h, rep * nq, d)

        def centered(x):  # softmax ignores a constant added to a query's logits
            return x - x.mean(-1, keepdim=True)

        denom = centered(q @ k.transpose(-1, -2)).square().sum(dim=(0, 2, 3)).clamp_min(tiny)
    else:
        denom = k.square().sum(dim=(0, 2, 3)).clamp_min(tiny)
    norms = key_token_norms(keys[:, :, :n])[:, None, :, None]
    errs = []
    for rot, scale in candidates:
        diff = k - _roundtrip(k, norms, bits, group_size, rot, scale)
        if queries is not None:
            diff = centered(q @ diff.transpose(-1, -2))
        errs.append(diff.square().sum(dim=(0, 2, 3)) / denom)
    return torch.stack(errs)


def allowed_candidates(rotate="auto", scale="auto") -> list[tuple[bool, bool]]:
    """The ``CANDIDATES`` (in tie-break order) a setting lets compete: "auto" allows both values, a bool only itself."""
    return [(r, c) for r, c in CANDIDATES if (rotate == "auto" or r == rotate) and (scale == "auto" or c == scale)]


def choose_key_flags(
    keys: torch.Tensor,
    bits: int,
    group_size: int,
    queries: torch.Tensor | None = None,
    max_tokens: int = MAX_TOKENS,
    rotate="auto",
    scale="auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each kv head's key transform; returns ``(rotated bool[Hkv], scaled bool[Hkv])`` on keys' device.

    keys: ``[B, Hkv, T, D]`` (any float dtype, T >= 0): the keys of the layer's first quantization (the
    complete blocks of the prompt, after RoPE). queries: ``[B, Hq, Tq, D]`` of the same step (after RoPE;
    only the last ``NUM_QUERIES`` are used), or None for the keys-only proxy. The cache calls this once per
    layer, when it quantizes its first block(s), and stores the result in ``key_rotated`` / ``key_scaled``;
    the flags never change afterwards. Deterministic.
    With fewer than ``group_size`` tokens returns ``FALLBACK_FLAGS`` for every head. ``rotate`` / ``scale``:
    "auto" (chosen) or a bool (fixed: only candidates with that setting compete).
    """
    for name, v in (("rotate", rotate), ("scale", scale)):
        if v != "auto" and not isinstance(v, bool):
            raise ValueError(f"{name} must be 'auto' or a bool, got {v!r}")
    if keys.dim() != 4:
        raise ValueError(f"keys must be [B, Hkv, T, D], got {tuple(keys.shape)}")
    h = keys.shape[1]
    if min(keys.shape[2], max_tokens) < group_size:
        fr, fs = FALLBACK_FLAGS
        full = lambda v: torch.full((h,), v, dtype=torch.bool, device=keys.device)  # noqa: E731
        return full(fr if rotate == "auto" else rotate), full(fs if scale == "auto" else scale)
    allowed = allowed_candidates(rotate, scale)
    errs = key_transform_errors(keys, bits, group_size, queries, max_tokens, candidates=allowed)
    best = errs.argmin(dim=0)  # first minimum on ties (CANDIDATES order)
    table = torch.tensor(allowed, dtype=torch.bool, device=keys.device)  # [n_allowed, 2]
    return table[best, 0].clone(), table[best, 1].clone()
