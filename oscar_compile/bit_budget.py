"""A bits budget between 2 and 4: which layers get 4-bit codes (``OScaRConfig(bits=2.5)``).

Rule. A budget ``b`` in (2, 4) over ``L`` quantized layers gives 4 bits to ``n4 = floor(L * (b - 2) / 2)``
layers and 2 bits to the others, so the mean code width never exceeds ``b`` (:func:`num_four_bit`). Which
layers: the ``n4`` with the highest **predicted damage at 2 bits** (:func:`layer_scores`), computed once,
from the first step (the prompt), without calibration data; ties go to the earlier layer
(:func:`allocate_layer_bits`: deterministic).

Predictor: two views of what 2 bits do to a layer, computed on the prompt with its keys and values quantized
exactly as the cache would store them (same groups, fp16 parameters, key flags as the cache decides them),
with the prompt's last ``NUM_QUERIES`` queries and its first ``MAX_TOKENS`` keys (whole groups):

* :func:`layer_damage` (``"relative_value"``): the attention output's relative error, scaled by the size of
  what the layer writes: ``||Ô - O||² / ||O||² * mean(V²)``, ``O = softmax(Q Kᵀ / sqrt(D)) V``;
* the key-logit error of the "auto" key rule (``kernels.key_transform.key_transform_errors``, the smallest
  over the allowed key transforms), summed over kv heads.

Layers are ranked by each; the damage score is the sum of the two ranks (:func:`combine_ranks`). Measured
against the per-layer damage (KL divergence of the next-token distribution from the bf16 cache's, only that
layer at 2 bits): Spearman +0.58 (SmolLM2) / +0.66 (Qwen2.5), and the 4-bit layers it picks hold 57-98% of
the damage the best possible pick would remove; either view alone fails on one model (the output view picks
0.24 of the best on Qwen2.5 at 3 layers, the key view 0.30 on SmolLM2). Chosen on the same two models and
windows it is scored on (benchmarks/README.md, "Bits budget").

Where it is decided: ``eval.FakeQuantCache`` (every layer holds the prefill before any block is quantized),
:func:`plan_layer_bits` (a full-precision pass over the prompt's first ``MAX_TOKENS`` tokens, used by
``OScaRCache``'s ``generate`` hook before it allocates), or by hand (``OScaRConfig(bits=2.5, layer_bits=...)``).
A budget's allocation then gives each layer its own ``CacheFormat`` (``config.layer(i)``), so the Triton
kernels see bits 2 or 4 per layer as a compile-time constant.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .config import OScaRConfig
from .fake_quant import resolve_key_flags
from .kernels.key_transform import MAX_TOKENS, NUM_QUERIES, allowed_candidates, key_transform_errors
from .kernels.quantization import dequantize_keys, dequantize_values, quantize_keys, quantize_values

__all__ = ["allocate_layer_bits", "combine_ranks", "layer_damage", "layer_scores", "num_four_bit", "plan_layer_bits",
           "record_prompt"]

LOW_BITS, HIGH_BITS = 2, 4


def num_four_bit(budget: float, num_layers: int) -> int:
    """Layers that get 4 bits under ``budget`` (mean code bits <= budget, as many as fit)."""
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if not LOW_BITS <= budget <= HIGH_BITS:
        raise ValueError(f"budget must be in [{LOW_BITS}, {HIGH_BITS}], got {budget}")
    # the small epsilon keeps e.g. 24 * (2.25 - 2) / 2 = 3 exact in floating point
    return min(num_layers, math.floor(num_layers * (budget - LOW_BITS) / (HIGH_BITS - LOW_BITS) + 1e-9))


def allocate_layer_bits(scores, budget: float) -> tuple[int, ...]:
    """Per-layer code widths for ``budget``: 4 bits to the ``num_four_bit`` highest ``scores`` (ties: the
    earlier layer), 2 bits to the rest. ``scores``: one float per quantized layer, in layer order."""
    scores = [float(s) for s in scores]
    if any(math.isnan(s) for s in scores):
        raise ValueError(f"allocate_layer_bits: NaN score in {scores}")
    n4 = num_four_bit(budget, len(scores))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    high = set(order[:n4])
    return tuple(HIGH_BITS if i in high else LOW_BITS for i in range(len(scores)))


@torch.no_grad()
def layer_damage(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None, config: OScaRConfig,
                 bits: int = LOW_BITS, max_tokens: int = MAX_TOKENS, num_queries: int = NUM_QUERIES,
                 measure: str = "relative_value") -> float:
    """Predicted damage of storing this layer at ``bits`` (module docstring), a float >= 0.

    keys, values: ``[B, Hkv, T, D]`` the prompt's (after RoPE); queries ``[B, Hq, Tq, D]`` its last queries
    (after RoPE), or None: then the keys' own rows stand in as queries (a weaker proxy). Fewer than one
    group of tokens: 0.0 (nothing the cache would quantize). ``measure``: ``"output"`` the absolute error
    ``||ΔO||²``; ``"relative"`` divided by ``||O||²``; ``"relative_value"`` the relative error times the
    values' mean square (how large what the layer writes is). Compared in benchmarks/README.md.
    """
    b, h, t, d = keys.shape
    g = config.group_size
    n = min(t, max_tokens) // g * g
    if n == 0:
        return 0.0
    cfg = config.replace(bits=bits, layer_bits=None)
    k = keys[:, :, :n].to(torch.float32)
    v = values[:, :, :n].to(torch.float32)
    if queries is None:
        q = k[:, :, -num_queries:]
    else:
        q = queries[:, :, -num_queries:].to(torch.float32)
    rotate, scale = resolve_key_flags(k, cfg, queries)
    k_hat = dequantize_keys(quantize_keys(k, bits, g, rotate, scale), torch.float32)
    v_hat = dequantize_values(quantize_values(v, bits, g, cfg.rotate_values), torch.float32)
    rep = q.shape[1] // h

    def attend(kk, vv):  # [B, Hq, Nq, D]; every query sees the n scored keys (they precede it in the prompt)
        kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
        return torch.softmax(q @ kk.transpose(-1, -2) * d ** -0.5, dim=-1) @ vv

    ref = attend(k, v)
    err = (attend(k_hat, v_hat) - ref).square().sum()
    if measure == "output":
        return float(err)
    rel = err / ref.square().sum().clamp_min(1e-30)
    if measure == "relative":
        return float(rel)
    if measure == "relative_value":
        return float(rel * v.square().mean())
    raise ValueError(f"measure must be 'output', 'relative' or 'relative_value', got {measure!r}")


def key_logit_error(keys: torch.Tensor, queries: torch.Tensor | None, config: OScaRConfig, bits: int = LOW_BITS) -> float:
    """The "auto" key rule's error at ``bits`` (its best allowed transform per kv head), summed over kv heads."""
    if min(keys.shape[2], MAX_TOKENS) < config.group_size:
        return 0.0
    allowed = allowed_candidates(config.rotate_keys, config.token_scaling)
    errs = key_transform_errors(keys, bits, config.group_size, queries, candidates=allowed)
    return float(errs.min(0).values.sum())


def layer_scores(keys, values, queries, config: OScaRConfig) -> tuple[float, float]:
    """``(relative_value output damage, key-logit error)`` of one layer at 2 bits (module docstring)."""
    return layer_damage(keys, values, queries, config), key_logit_error(keys, queries, config)


def combine_ranks(scores) -> list[float]:
    """``scores``: per layer a tuple of predictor values; returns per layer the sum of its ranks (0 = least
    damaged) under each predictor, ties ranked by layer order (deterministic)."""
    scores = [tuple(s) for s in scores]
    total = [0.0] * len(scores)
    for j in range(len(scores[0]) if scores else 0):
        for rank, i in enumerate(sorted(range(len(scores)), key=lambda i: (scores[i][j], -i))):
            total[i] += rank
    return total


@contextlib.contextmanager
def record_prompt(model, store: dict, last: int = NUM_QUERIES):
    """While the model runs, record each attention layer's last ``last`` queries (after RoPE) in
    ``store[layer_idx]``, through transformers' attention-function registry (any attn_implementation)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.config._attn_implementation
    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    inner = mapping.get(impl)
    if inner is None:  # eager attention is not in the mapping: record through SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as inner

        impl = "sdpa"
        model.config._attn_implementation = impl

    def recording(module, query, *args, **kwargs):
        store[module.layer_idx] = query[:, :, -last:].detach().clone()
        return inner(module, query, *args, **kwargs)

    mapping[impl] = recording
    try:
        yield
    finally:
        mapping[impl] = inner


def budget_from_prompt(prompt_kv, config: OScaRConfig, layers=None, agree=None) -> OScaRConfig:
    """``config`` with its allocation decided from a prompt's per-layer ``(keys, values, queries)``.

    prompt_kv: one entry per decoder layer; ``layers``: indices of the layers the cache quantizes (default:
    all), in order: ``layer_bits`` has one entry per quantized layer. ``agree``: maps the raw per-layer scores
    (``[layers, 2]`` float64) to the ones every process must use; under tensor parallelism each rank sees
    only its kv heads, so :func:`plan_layer_bits` passes ``tensor_parallel.agree_sum`` (the sum of the ranks'
    scores) and every rank allocates the same bits. A uniform or decided config is returned unchanged."""
    if not config.needs_allocation:
        return config
    layers = range(len(prompt_kv)) if layers is None else layers
    raw = [layer_scores(prompt_kv[i][0], prompt_kv[i][1], prompt_kv[i][2], config) for i in layers]
    if agree is not None and raw:
        raw = agree(torch.tensor(raw, dtype=torch.float64)).tolist()
    return config.with_layer_bits(allocate_layer_bits(combine_ranks(raw), config.bits))


@torch.no_grad()
def plan_layer_bits(model, input_ids: torch.Tensor, config: OScaRConfig, layers=None,
                    max_tokens: int = MAX_TOKENS, attention_mask: torch.Tensor | None = None) -> OScaRConfig:
    """Decide a budget's allocation from a prompt: one full-precision pass (transformers' ``DynamicCache``)
    over ``input_ids[:, :max_tokens]`` ``[B, T]``, then :func:`budget_from_prompt`. The cost is a prefill of at
    most ``max_tokens`` tokens (benchmarks/README.md, "Bits budget"). Runs the model's eager forward (not a
    compiled call), so it traces nothing. On a tensor-parallel model every rank must call it (the forward and
    the score agreement are collective) and every rank gets the same allocation."""
    if not config.needs_allocation:
        return config
    from transformers import DynamicCache

    ids = input_ids[:, :max_tokens].to(model.device)
    extra = {} if attention_mask is None else {"attention_mask": attention_mask[:, :max_tokens].to(model.device)}
    cache = DynamicCache(config=model.config)
    queries: dict[int, torch.Tensor] = {}
    forward = type(model).forward
    with record_prompt(model, queries):
        try:
            forward(model, input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1, **extra)
        except TypeError:  # transformers 5.17 names the cache argument past_key_values
            forward(model, input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
    kv = [(layer.keys, layer.values, queries.get(i)) for i, layer in enumerate(cache.layers)]
    from .tensor_parallel import agree_sum, tp_group

    agree = (lambda scores: agree_sum(scores, model)) if tp_group(model) is not None else None
    return budget_from_prompt(kv, config, layers, agree)
