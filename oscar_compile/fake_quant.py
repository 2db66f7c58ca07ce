"""``fake_quantize``: quantize then dequantize a whole K/V history with the residual rule.

The research and ablation entry point (and the oracle for the cache and the compiled path).
"""

from __future__ import annotations

import torch

import numbers

from .config import OScaRConfig
from .kernels.cache_layout import check_storable
from .kernels.key_transform import choose_key_flags
from .kernels.quantization import dequantize_keys, dequantize_values, quantize_keys, quantize_values

__all__ = ["fake_quantize", "resolve_key_flags"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, Hkv, T, D], got {type(x).__module__}.{type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor [B, Hkv, T, D], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def _check(keys, values, config, queries, prompt_length) -> None:
    if not isinstance(config, OScaRConfig):
        raise TypeError(f"config must be an OScaRConfig or None, got {type(config).__name__}")
    _check_tensor("keys", keys)
    _check_tensor("values", values)
    if keys.shape != values.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same shape")
    b, h, t, d = keys.shape
    if min(b, h, d) < 1:
        raise ValueError(f"keys/values {tuple(keys.shape)}: B, Hkv and D must be >= 1 (only T may be 0)")
    if keys.dtype != values.dtype:
        raise TypeError(f"keys are {keys.dtype} but values {values.dtype}: pass both in the model's one dtype")
    if keys.device != values.device:
        raise ValueError(f"keys on {keys.device} but values on {values.device}")
    if d % config.group_size:
        raise ValueError(f"head_dim {d} not a multiple of OScaRConfig.group_size {config.group_size} (keys: {tuple(keys.shape)})")
    if queries is not None:
        _check_tensor("queries", queries)
        qb, hq, _, qd = queries.shape
        if qb != b or qd != d or hq < 1 or hq % h:
            raise ValueError(
                f"queries must be [B={b}, Hq, Tq, D={d}] with Hq a positive multiple of Hkv={h}, "
                f"got {tuple(queries.shape)}"
            )
        if queries.device != keys.device:
            raise ValueError(f"queries on {queries.device} but keys on {keys.device}")
    if prompt_length is not None:
        # a history that quantizes nothing never reads it (a caller may pass the prompt's length before the
        # history holds the prompt); one that does must hold the whole first step
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, numbers.Integral):
            raise TypeError(f"prompt_length must be None or an int in [1, T={t}], got {prompt_length!r}")
        if not 1 <= prompt_length <= (t if t >= config.residual_length else prompt_length):
            raise ValueError(f"prompt_length must be None or an int in [1, T={t}] (the keys' length), got {prompt_length}")


def resolve_key_flags(keys: torch.Tensor, config: OScaRConfig, queries: torch.Tensor | None = None):
    """Per-head key flags ``(rotate, scale)`` for a layer whose first quantization holds ``keys``.

    keys: ``[B, Hkv, T, D]`` the complete blocks quantized first (normally the prompt's); queries:
    optional ``[B, Hq, Tq, D]`` of that step (the prompt's). Bools pass through unchanged; ``"auto"`` is
    decided by ``kernels.key_transform.choose_key_flags``. Returns bools or bool tensors ``[Hkv]``.
    """
    if not config.adaptive_keys:
        return config.rotate_keys, config.token_scaling
    if config.is_budget:
        raise ValueError("resolve_key_flags: pass the layer's own config (config.layer(i)), not a bits budget")
    return choose_key_flags(
        keys, config.bits, config.group_size, queries=queries, rotate=config.rotate_keys, scale=config.token_scaling
    )


def fake_quantize(
    keys: torch.Tensor,
    values: torch.Tensor,
    config: OScaRConfig | None = None,
    queries: torch.Tensor | None = None,
    prompt_length: int | None = None,
    layer: int | None = None,
):
    """Return ``(keys_hat, values_hat)``: what attention reads from an OScaR cache holding these tokens.

    keys, values: ``[B, Hkv, T, D]`` float32/float16/bfloat16 (one dtype, one device), B, Hkv, D >= 1, D a
    multiple of ``config.group_size``.
    The first ``floor(T / R) * R`` tokens (``R = config.residual_length``) are quantized in complete
    blocks and dequantized back to the original space; the tail is returned unchanged. Outputs have
    the inputs' shapes and dtypes. With ``rotate_keys``/``token_scaling == "auto"`` the per-head key
    transform is chosen from the quantized keys (all complete blocks, as when a prompt is prefilled in one
    step) and ``queries`` ``[B, Hq, Tq, D]`` when given (:func:`resolve_key_flags`), per sequence. So with
    "auto" a longer history may decide differently from a shorter one; the cache decides once, at its first
    quantization, and keeps the flags (pass that history here to reproduce it).

    prompt_length: the OScaR cache decides "auto" at its first step, from that step's keys and queries
    (``oscar_compile.kv_tensor``); pass the first step's length (and its ``queries``) to decide from
    ``keys[:, :, :prompt_length]`` instead, which reproduces the cache for batch 1 (a batched cache makes one
    joint decision for all its sequences). None: the quantized blocks decide, as above. An int >= 1, at most
    T when the history quantizes a block (a shorter history ignores it).

    layer: which quantized layer these tokens belong to, for a bits budget (``OScaRConfig(bits=2.5,
    layer_bits=...)``): that layer's code width is used (``config.layer(layer)``). A budget needs it (and a
    decided allocation: ``oscar_compile.bit_budget``); a uniform config ignores it.

    Raises ValueError when the cache could not store the quantized prefix (``kernels.cache_layout.
    check_storable``, the check the cache's reference path makes): non-finite tokens, or tokens whose group
    parameters fall beyond the fp16 range (after rotation and norm division). TypeError/ValueError for
    arguments of the wrong type or shape, naming the argument.
    """
    config = OScaRConfig() if config is None else config
    if isinstance(config, OScaRConfig) and config.is_budget:
        if layer is None:
            raise ValueError(f"fake_quantize: OScaRConfig(bits={config.bits}) is a bits budget: pass layer=i (the "
                             "layer these keys/values belong to) and a decided allocation (layer_bits)")
        config = config.layer(layer)
    _check(keys, values, config, queries, prompt_length)
    t = keys.shape[2]
    n_quant = (t // config.residual_length) * config.residual_length
    if n_quant == 0:
        return keys.clone(), values.clone()
    head_k, head_v = keys[:, :, :n_quant], values[:, :, :n_quant]
    if config.adaptive_keys:  # each sequence decides its own flags (batch items stay independent)
        parts = []
        for b in range(keys.shape[0]):
            q_b = None if queries is None else queries[b:b + 1]
            decide_k = head_k if prompt_length is None else keys[:, :, :prompt_length]
            rotate, scale = resolve_key_flags(decide_k[b:b + 1], config, q_b)
            qk = quantize_keys(head_k[b:b + 1], config.bits, config.group_size, rotate, scale)
            check_storable("keys", head_k[b:b + 1], qk.mn, qk.scale, qk.norms)
            parts.append(dequantize_keys(qk, keys.dtype))
        k_deq = torch.cat(parts)
    else:
        qk = quantize_keys(head_k, config.bits, config.group_size, config.rotate_keys, config.token_scaling)
        check_storable("keys", head_k, qk.mn, qk.scale, qk.norms)
        k_deq = dequantize_keys(qk, keys.dtype)
    qv = quantize_values(head_v, config.bits, config.group_size, config.rotate_values)
    check_storable("values", head_v, qv.mn, qv.scale)
    keys_hat = torch.cat([k_deq, keys[:, :, n_quant:]], dim=2)
    values_hat = torch.cat([dequantize_values(qv, values.dtype), values[:, :, n_quant:]], dim=2)
    return keys_hat, values_hat
