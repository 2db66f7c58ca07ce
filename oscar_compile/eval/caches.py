"""KV methods under evaluation, as ``transformers`` caches that reuse one full-precision prefill.

Rule (the same as the OScaR cache, DESIGN.md §2.5-2.6): a step's queries see
``fake_quantize(history before the step)`` followed by the step's own keys/values at full precision; the
step is then appended to the history. Complete blocks of ``R`` tokens are quantized once and kept
(dequantized) so a decode step costs one block's quantization at most, not the whole history.

The prefill is the same for every method (full-precision attention over the prompt), so the harness runs
it once per window and seeds each method's cache with its keys/values (``seed``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..config import OScaRConfig
from ..fake_quant import resolve_key_flags
from ..kernels.hadamard import hadamard_transform
from ..kernels.quantization import dequantize_groups, key_token_norms, quantize_groups

__all__ = ["KVMethod", "FakeQuantLayer", "fake_keys", "fake_values", "FakeQuantCache", "make_cache", "bits_per_element"]


@dataclass(frozen=True)
class KVMethod:
    """One row of the accuracy table.

    kind: ``"none"`` (history untouched: must reproduce the plain model), ``"bf16"`` (history stored in
    bf16, the baseline cache), ``"oscar"`` (fake-quantized per ``config``), ``"quanto"`` (transformers'
    ``QuantizedCache`` with optimum-quanto, ``nbits``, residual 128, its default axes and group size).
    """

    name: str
    kind: str
    config: OScaRConfig | None = None
    nbits: int = 16
    sink_tokens: int = 0  # leading tokens kept at full precision (data-free "attention sink" idea)
    use_queries: bool = True  # "auto" decisions see the prompt's queries (False: keys-only proxy)
    quantize_sliding: bool = True  # False: sliding-window layers stored as the bf16 baseline (transformers' layer)
    only_layers: tuple | None = None  # quantize only these decoder layers, the others bf16 (per-layer damage)


def fake_keys(k: torch.Tensor, bits: int, group_size: int, rotated: torch.Tensor, scaled: torch.Tensor):
    """``dequantize_keys(quantize_keys(k, ...))`` without packing, Hadamard only on rotated heads.

    k: ``[B, Hkv, T, D]`` (T a multiple of group_size); rotated/scaled: bool ``[Hkv]``. Same operations
    as the reference, so the result is bit-identical (tests check it); fp32 out.
    """
    b, h, t, d = k.shape
    norms = key_token_norms(k)[:, None, :, None]
    x = k.to(torch.float32).clone()
    rot = rotated.nonzero().flatten().tolist()
    if rot:
        x[:, rot] = hadamard_transform(x[:, rot])
    x = torch.where(scaled[:, None, None], x / norms, x)
    codes, mn, scale = quantize_groups(x.reshape(b, h, t // group_size, group_size, d), bits, dim=3)
    x = dequantize_groups(codes, mn, scale).reshape(b, h, t, d)
    x = torch.where(scaled[:, None, None], x * norms, x)
    if rot:
        x[:, rot] = hadamard_transform(x[:, rot])
    return x


def fake_values(v: torch.Tensor, bits: int, group_size: int, rotate: bool):
    """``dequantize_values(quantize_values(v, ...))`` without packing (bit-identical), fp32 out."""
    b, h, t, d = v.shape
    x = hadamard_transform(v) if rotate else v.to(torch.float32)
    codes, mn, scale = quantize_groups(x.reshape(b, h, t, d // group_size, group_size), bits, dim=4)
    x = dequantize_groups(codes, mn, scale).reshape(b, h, t, d)
    return hadamard_transform(x) if rotate else x


class FakeQuantLayer(DynamicLayer):
    """One layer's cache: the stored history and the view attention reads, in preallocated buffers.

    ``hist_*[:, :, :length]`` hold the history as stored (rounded to ``store_dtype``); ``view_*`` hold what
    attention reads: dequantized complete blocks in ``[0, n_quant)``, the stored residual after them, and
    the current step's own keys/values at full precision. ``key_rotated``/``key_scaled`` (``[B, Hkv]``
    bool) are each sequence's per-head key flags, decided (for "auto") when its first block is quantized
    and fixed afterwards.
    """

    def __init__(self, method: KVMethod, store_dtype: torch.dtype | None = torch.bfloat16):
        super().__init__()
        self.method = method
        self.store_dtype = None if method.kind == "none" else store_dtype
        self.length = self.n_quant = 0
        self.hist_k = self.hist_v = self.view_k = self.view_v = None
        self.key_rotated = self.key_scaled = None
        self.config = method.config  # a budget's decided allocation: this layer's own (FakeQuantCache sets it)
        self.seq_bits = None  # a bits budget: this layer's code width per sequence (decided by the cache)
        self._pending = None
        self.prompt_queries = None  # [B, Hq, Nq, D]: the prompt's last queries, for the "auto" decision

    def _store(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.store_dtype is None else x.to(self.store_dtype).to(x.dtype)

    def _reserve(self, like: torch.Tensor, n: int) -> None:
        need = self.length + n
        if self.hist_k is not None and self.hist_k.shape[2] >= need:
            return
        cap = max(need, 2 * (0 if self.hist_k is None else self.hist_k.shape[2]))
        b, h, _, d = like.shape
        bufs = [torch.empty(b, h, cap, d, dtype=like.dtype, device=like.device) for _ in range(4)]
        if self.hist_k is not None:
            for new, old in zip(bufs, (self.hist_k, self.hist_v, self.view_k, self.view_v)):
                new[:, :, : self.length] = old[:, :, : self.length]
        self.hist_k, self.hist_v, self.view_k, self.view_v = bufs

    def _quantize_blocks(self, start: int, stop: int) -> None:
        # Each sequence of the batch decides its own key flags (as it would running alone with batch 1),
        # so batching windows does not change any method's numbers.
        s = self.method.sink_tokens
        k, v = self.hist_k[:, :, start:stop], self.hist_v[:, :, start:stop]
        b, h = k.shape[:2]
        if self.seq_bits is None and self.config.is_budget:
            raise ValueError(f"{self.method.name}: a bits budget's allocation is not decided (make_cache with the prefill)")
        cfgs = [self.config.replace(bits=self.seq_bits[i], layer_bits=None) if self.seq_bits is not None
                else self.config for i in range(b)]
        if self.key_rotated is None:
            q = self.prompt_queries
            flags = [resolve_key_flags(k[i:i + 1], cfgs[i], None if q is None else q[i:i + 1]) for i in range(b)]
            as_t = lambda f: f if isinstance(f, torch.Tensor) else torch.full((h,), f, dtype=torch.bool)  # noqa: E731
            self.key_rotated = torch.stack([as_t(r) for r, _ in flags]).to(k.device)  # [B, Hkv]
            self.key_scaled = torch.stack([as_t(c) for _, c in flags]).to(k.device)
        k_hat = torch.cat([fake_keys(k[i:i + 1], c.bits, c.group_size, self.key_rotated[i], self.key_scaled[i])
                           for i, c in enumerate(cfgs)])
        v_hat = torch.cat([fake_values(v[i:i + 1], c.bits, c.group_size, c.rotate_values) for i, c in enumerate(cfgs)])
        if start < s:  # keep the first `sink_tokens` tokens at full precision
            k_hat[:, :, : s - start] = k[:, :, : s - start]
            v_hat[:, :, : s - start] = v[:, :, : s - start]
        self.view_k[:, :, start:stop] = k_hat
        self.view_v[:, :, start:stop] = v_hat

    def _write(self, keys: torch.Tensor, values: torch.Tensor, view_full_precision: bool) -> None:
        n, t0 = keys.shape[2], self.length
        self._reserve(keys, n)
        sk, sv = self._store(keys), self._store(values)
        self.hist_k[:, :, t0:t0 + n], self.hist_v[:, :, t0:t0 + n] = sk, sv
        self.view_k[:, :, t0:t0 + n] = keys if view_full_precision else sk
        self.view_v[:, :, t0:t0 + n] = values if view_full_precision else sv
        self.length += n
        self.keys, self.values = self.hist_k[:, :, : self.length], self.hist_v[:, :, : self.length]

    def seed(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        """Put a prefill's keys/values in the history (nothing quantized until the next step reads it).

        queries: the prompt's last queries ``[B, Hq, Nq, D]`` (after RoPE), used by the "auto" key transform.
        """
        self.lazy_initialization(keys, values)
        self.prompt_queries = queries
        self._write(keys, values, view_full_precision=False)

    def get_seq_length(self) -> int:
        return self.length

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending is not None:  # the previous step is now history: read it as stored
            p0, p1 = self._pending
            self.view_k[:, :, p0:p1], self.view_v[:, :, p0:p1] = self.hist_k[:, :, p0:p1], self.hist_v[:, :, p0:p1]
            self._pending = None
        if self.method.kind == "oscar":
            r = self.method.config.residual_length
            if self.length // r * r > self.n_quant:
                self._quantize_blocks(self.n_quant, self.length // r * r)
                self.n_quant = self.length // r * r
        t0 = self.length
        # The step reads its own keys/values at full precision; they are stored (rounded) for later steps.
        self._write(key_states, value_states, view_full_precision=True)
        self._pending = (t0, self.length)
        return self.view_k[:, :, : self.length], self.view_v[:, :, : self.length]


class FakeQuantCache(Cache):
    """A ``Cache`` of :class:`FakeQuantLayer` (one per decoder layer) for ``method``.

    ``quantized``: the decoder layers the method quantizes (the others hold the bf16 baseline: sliding
    layers with ``quantize_sliding=False``, layers outside ``only_layers``). A bits budget is decided per
    sequence once every layer holds the prefill (:meth:`decide_budget`), as the cache decides at its first step.
    """

    def __init__(self, method: KVMethod, num_layers: int, store_dtype: torch.dtype | None = torch.bfloat16,
                 quantized=None):
        self.quantized = list(range(num_layers)) if quantized is None else list(quantized)
        bf16 = KVMethod("bf16", "bf16")
        super().__init__(layers=[FakeQuantLayer(method if i in self.quantized else bf16, store_dtype)
                                 for i in range(num_layers)])
        self.method = method
        cfg = method.config
        if cfg is not None and cfg.is_budget and cfg.layer_bits is not None:  # decided: each layer its own
            for j, i in enumerate(self.quantized):
                self.layers[i].config = cfg.layer(j)

    def decide_budget(self) -> None:
        """Each sequence's per-layer code widths for a bits budget, from the seeded prompt (``bit_budget``)."""
        from ..bit_budget import budget_from_prompt

        cfg = self.method.config
        if cfg is None or not cfg.is_budget or self.method.kind != "oscar":
            return
        layers = [self.layers[i] for i in self.quantized]
        b = layers[0].hist_k.shape[0]
        for seq in range(b):
            kv = [(la.keys[seq:seq + 1], la.values[seq:seq + 1],
                   None if la.prompt_queries is None else la.prompt_queries[seq:seq + 1]) for la in layers]
            bits = budget_from_prompt(kv, cfg).layer_bits if cfg.layer_bits is None else cfg.layer_bits
            for la, nb in zip(layers, bits):
                la.seq_bits = (la.seq_bits or []) + [nb]

    def layer_bits(self) -> list[tuple[int, ...]]:
        """Per sequence, the code width of each quantized layer (a budget), after :meth:`decide_budget`."""
        layers = [self.layers[i] for i in self.quantized]
        if not layers or layers[0].seq_bits is None:
            return []
        return [tuple(la.seq_bits[s] for la in layers) for s in range(len(layers[0].seq_bits))]

    def key_flags(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key_rotated [B, Hkv], key_scaled [B, Hkv])`` (None before the first block is quantized)."""
        return [(layer.key_rotated, layer.key_scaled) for layer in self.layers]


def make_cache(method: KVMethod, model_config, prefill_kv=None, store_dtype=torch.bfloat16) -> Cache:
    """A fresh cache for ``method``, seeded with ``prefill_kv`` if given.

    prefill_kv: per layer ``(keys, values)`` or ``(keys, values, prompt_queries)`` (see ``harness.prefill``).
    """
    n_layers = model_config.get_text_config(decoder=True).num_hidden_layers
    if method.kind == "quanto":
        from transformers.cache_utils import QuantizedCache

        cache = QuantizedCache(backend="quanto", config=model_config, nbits=method.nbits, residual_length=128)
        if prefill_kv is not None:
            for layer, (k, v, *_) in zip(cache.layers, prefill_kv):
                # The incumbent's own prefill path: its first update quantizes the whole prompt.
                layer.update(k.to(torch.bfloat16).to(k.dtype).contiguous(), v.to(torch.bfloat16).to(v.dtype).contiguous())
        return cache
    if method.kind not in ("none", "bf16", "oscar"):
        raise ValueError(f"unknown method kind {method.kind!r} (method {method.name})")
    text = model_config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None) or ["full_attention"] * n_layers
    if getattr(text, "layer_types", None) is None and getattr(text, "sliding_window", None) is not None:
        types = ["sliding_attention"] * n_layers  # Mistral-style: every layer slides
    quantized = [i for i in range(n_layers)
                 if (method.quantize_sliding or types[i] != "sliding_attention")
                 and (method.only_layers is None or i in method.only_layers)]
    cache = FakeQuantCache(method, n_layers, store_dtype, quantized)
    if prefill_kv is not None:
        for layer, (k, v, *q) in zip(cache.layers, prefill_kv):
            layer.seed(k, v, q[0] if q and method.use_queries else None)
        cache.decide_budget()
    return cache


def bits_per_element(method: KVMethod, num_kv_heads: int, head_dim: int, num_layers: int | None = None) -> float:
    """Stored bits per K/V element of the quantized layers at long context (residual window amortized away).

    A bits budget: the exact mean of its allocation over ``num_layers`` quantized layers (needed then)."""
    if method.kind in ("none", "bf16"):
        return 16.0
    if method.kind == "quanto":
        # quanto: nbits codes + fp16 scale and zero point per group of 64 (its default q_group_size).
        return method.nbits + 2 * 16 / 64
    cfg = method.config
    per_group = 2 * 16 / cfg.group_size  # fp16 mn + scale per group, keys and values alike
    norms = 32 / (2 * num_kv_heads * head_dim)  # one fp32 norm per token per layer, over K and V elements
    code = cfg.bits
    if cfg.is_budget:
        from ..bit_budget import num_four_bit

        if cfg.layer_bits is not None:
            code = cfg.mean_code_bits
        elif num_layers is None:
            raise ValueError(f"bits_per_element: the budget {cfg.bits} needs num_layers")
        else:
            code = 2 + 2 * num_four_bit(cfg.bits, num_layers) / num_layers
    return code + per_group + norms
