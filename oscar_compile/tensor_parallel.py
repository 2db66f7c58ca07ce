"""OScaR caches on tensor-parallel transformers models (``from_pretrained(..., tp_plan="auto")`` under torchrun).

Nothing to call: ``oscar.compile(model)`` / :func:`~oscar_compile.hf_cache.use_oscar_cache` / an
:class:`~oscar_compile.hf_cache.OScaRCache` work on a TP-sharded model as on one device. transformers' TP plan
shards ``q/k/v_proj`` by columns (so by heads: rank ``r`` of ``W`` holds kv heads ``[r*Hkv/W, (r+1)*Hkv/W)``
and their query heads) and ``o_proj`` by rows, all-reducing its output. Each rank's attention layer therefore
sees ``[B, Hkv/W, T, D]`` keys and values, and its cache layer allocates, quantizes and attends over those
local heads only. The decode step adds no collective to the model's own (tests count them).

This module holds what TP adds on top: the per-rank view of the model (:func:`tp_info`), per-rank memory
(:func:`memory_report`), the check that every rank made the same global decisions (:func:`check_consistent`),
and the numerics reference of the per-rank key norm (:func:`tp_fake_quantize`).

Key norm across ranks (:data:`KEY_NORM` = ``"per-rank"``)
--------------------------------------------------------
DESIGN §2.2 takes the omni-token key norm ``n_t`` over *all* kv heads of a layer. Under TP a rank holds
``Hkv/W`` of them. Two ways to keep going:

* **per-rank** (chosen): each rank's norm is over its own kv heads. No collective, no kernel change; rank
  ``r``'s layer is exactly single-process OScaR on its group of heads. TP output therefore equals
  single-process output with each group of ``Hkv/W`` consecutive kv heads quantized on its own
  (:func:`tp_fake_quantize`), and equals plain single-process OScaR whenever ``token_scaling`` is off
  (everything else is per head).
* **all-reduced**: all-reduce the per-token sum of squares (``[B, T]`` fp32, one all-reduce per layer per
  step) so every rank divides by the global norm: single-process numerics exactly, at the price of a third
  collective per layer in every decode step (the model already has two: ``o_proj``, ``down_proj``), a
  latency-bound one on the critical path, and a norm input to the append kernel.

Measured (``benchmarks/tp_accuracy.py``, README "Tensor parallelism"): the per-rank norm at its extreme
(one kv head per rank, a per-head norm) against the all-reduced one, continuation perplexity over bf16 on
SmolLM2-135M: essays +3.04% vs +3.73% (default config), +3.71% vs +3.66% (paper's); wiki +1.76% vs +0.10%,
+1.80% vs +0.54%. Mixed, within ~1.7 points at the extreme (with several heads per rank the two norms are
closer), so the per-rank norm is the default: the all-reduced one would need a norm input to the append
kernel and a third latency-bound collective per layer in every decode step (its cost: ``benchmarks/tp.py``). "auto" key flags are per kv head, so each rank decides its own heads
(from its own keys, queries and norms) and no decision needs agreeing; any *global* per-layer decision (the
config, the layer types and windows, per-layer bits) must be the same everywhere: it is derived from the
config on every rank, and :func:`check_consistent` verifies it (one collective, outside the decode loop).

Memory: the codes, group parameters, residual and key flags scale with the local heads (``1/W`` each); the
key norms (``[B, capacity]`` fp32 per layer) are per token and the ``lengths``/``offsets`` counters per
sequence, so every rank holds them whole (:func:`replicated_bytes`). Per rank, exactly:
``(single_process_bytes - replicated) / W + replicated``: at ``D = 128`` and 8 kv heads, W = 2, 0.5% above
``single_process_bytes / W`` (a norm is 32 bits per token against 6144 bits of codes and parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .config import OScaRConfig
from .fake_quant import fake_quantize

__all__ = [
    "KEY_NORM", "TPInfo", "agree_sum", "check_consistent", "local_kv_heads", "memory_report", "replicated_bytes",
    "tp_fake_quantize", "tp_group", "tp_info",
]

KEY_NORM = "per-rank"


@dataclass(frozen=True)
class TPInfo:
    """A rank's view of a TP-sharded model.

    rank/world: position in the TP group; kv_heads: this rank's kv heads per layer (an int, or a list when
    layers differ), what its cache layers allocate; group: the TP process group (None without TP).
    """

    rank: int
    world: int
    kv_heads: Union[int, list]
    group: object = None


def tp_group(model):
    """The TP process group of a transformers model loaded with a ``tp_plan``, else None."""
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None or (getattr(model, "_tp_size", None) or 1) <= 1:
        return None
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return mesh.get_group("tp") if mesh.ndim > 1 or "tp" in names else mesh.get_group()


def local_kv_heads(model) -> Union[int, list]:
    """kv heads of each layer on this rank: under a TP plan, transformers' own per-rank static-cache shape (the
    heads its plan leaves on a rank) where it has one, else the config's count."""
    tp = (getattr(model, "_tp_size", None) or 1) > 1 and hasattr(model, "_get_static_cache_init_shape")
    shape = model._get_static_cache_init_shape() if tp else None
    if shape is not None:
        return shape[0]
    text = model.config.get_text_config(decoder=True)
    return getattr(text, "num_key_value_heads", None) or text.num_attention_heads


def tp_info(model) -> TPInfo:
    """This rank's :class:`TPInfo` (``world == 1`` and ``group None`` for a model without TP)."""
    group = tp_group(model)
    if group is None:
        return TPInfo(0, 1, local_kv_heads(model), None)
    import torch.distributed as dist

    return TPInfo(dist.get_rank(group), dist.get_world_size(group), local_kv_heads(model), group)


def replicated_bytes(cache) -> int:
    """Bytes of an OScaR cache that do not shrink with the rank's heads: per token, the key norms
    (``[B, capacity]`` fp32 per layer), and per sequence the ``lengths``/``offsets`` counters of both halves."""
    total = 0
    for layer in cache.oscar_layers:
        if layer.is_initialized:
            for t in (layer.keys.key_norms, layer.keys.lengths, layer.keys.offsets, layer.values.lengths, layer.values.offsets):
                total += t.numel() * t.element_size()
    return total


def memory_report(cache, model=None, group=None) -> dict:
    """This rank's cache bytes next to every rank's (one ``all_gather_object``: call it outside decode).

    cache: an allocated :class:`~oscar_compile.hf_cache.OScaRCache`; group: the TP group (default: the
    model's, or none). Returns ``cache.memory_report()`` (this rank's ``oscar_bytes``, ``static_cache_bytes``
    of transformers' static cache on this rank, ``ratio``, ``kept_layers``) plus ``rank``, ``world``,
    ``replicated_bytes`` (:func:`replicated_bytes`: held whole on every rank), ``per_rank_oscar_bytes`` and
    ``per_rank_static_bytes`` (lists over ranks), ``total_oscar_bytes`` and ``total_static_bytes``.
    """
    if group is None and model is not None:
        group = tp_group(model)
    report = dict(cache.memory_report())
    mine = (report["oscar_bytes"], report["static_cache_bytes"], replicated_bytes(cache))
    if group is None:
        rank, world, rows = 0, 1, [mine]
    else:
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        rows = [None] * world
        dist.all_gather_object(rows, mine, group=group)
    report.update(
        rank=rank,
        world=world,
        replicated_bytes=mine[2],
        per_rank_oscar_bytes=[r[0] for r in rows],
        per_rank_static_bytes=[r[1] for r in rows],
        total_oscar_bytes=sum(r[0] for r in rows),
        total_static_bytes=sum(r[1] for r in rows),
    )
    return report


def _fingerprint(cache) -> list:
    """What must be the same on every rank: settings and every layer's layout (not its per-head flags)."""
    rows = [repr(getattr(cache, "oscar_config", None)), sorted(getattr(cache, "kept_layers", {}).items())]
    for i, layer in enumerate(cache.layers):
        row = [i, type(layer).__name__, getattr(layer, "window", None), getattr(layer, "max_cache_len", None)]
        keys = getattr(layer, "keys", None) if getattr(layer, "is_initialized", False) else None
        if keys is not None and hasattr(keys, "fmt"):  # an allocated OScaR layer: its format and sizes
            row += [tuple(keys.fmt), keys.capacity, tuple(keys.residual_keys.shape[1:]), str(keys.dtype)]
        elif keys is not None:
            row += [tuple(keys.shape[1:]), str(keys.dtype)]
        rows.append(row)
    return rows


def check_consistent(cache, model=None, group=None) -> None:
    """Raise ``RuntimeError`` if the ranks' caches disagree on a global decision (settings, layer kinds,
    windows, capacities, quantization format and per-rank head counts; per-layer bits once they exist).
    One ``all_gather_object``; a no-op without TP. Per-kv-head "auto" key flags are local and not compared."""
    if group is None and model is not None:
        group = tp_group(model)
    if group is None:
        return
    import torch.distributed as dist

    mine = _fingerprint(cache)
    rows = [None] * dist.get_world_size(group)
    dist.all_gather_object(rows, mine, group=group)
    bad = [r for r, row in enumerate(rows) if row != rows[0]]
    if bad:
        first = next(i for i, (a, b) in enumerate(zip(rows[0], rows[bad[0]])) if a != b)
        raise RuntimeError(
            f"OScaR caches differ across TP ranks (ranks {bad} vs rank 0): entry {first}: "
            f"{rows[bad[0]][first]!r} vs {rows[0][first]!r}; every rank must build its cache from the same "
            "config and model"
        )


def agree_sum(x: torch.Tensor, model=None, group=None) -> torch.Tensor:
    """``x`` summed over the TP ranks (a copy; ``x`` itself without TP): how a decision that must be global is
    made from per-rank statistics. E.g. a per-layer score summed over kv heads (``bit_budget``'s damage) is the
    sum of the ranks' scores over their heads, so every rank allocates the same per-layer bits. One
    all-reduce: call it where the decision is made (the first step), never per decode step."""
    if group is None and model is not None:
        group = tp_group(model)
    out = x.clone()
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(out, group=group)
    return out


def tp_fake_quantize(
    keys: torch.Tensor,
    values: torch.Tensor,
    config: Optional[OScaRConfig],
    world: int,
    queries: Optional[torch.Tensor] = None,
    prompt_length: Optional[int] = None,
):
    """What ``world`` TP ranks' OScaR caches hold for a layer's keys/values, gathered: :func:`fake_quantize`
    (same arguments) applied to each group of ``Hkv / world`` consecutive kv heads on its own, with the
    group's ``Hq / world`` query heads (the per-rank key norm, module docstring). ``world=1`` is
    :func:`fake_quantize` itself.

    keys, values: ``[B, Hkv, T, D]``; queries ``[B, Hq, Tq, D]`` or None. ``Hkv`` (and ``Hq``) must divide by
    ``world``, as transformers' TP plans require.
    """
    hkv = keys.shape[1]
    if isinstance(world, bool) or not isinstance(world, int) or world < 1 or hkv % world:
        raise ValueError(f"world must be a positive int dividing the {hkv} kv heads (keys {tuple(keys.shape)}), got {world!r}")
    if queries is not None and queries.shape[1] % world:
        raise ValueError(f"world {world} does not divide the {queries.shape[1]} query heads ({tuple(queries.shape)})")
    hg = hkv // world
    parts = []
    for g in range(world):
        heads = slice(g * hg, (g + 1) * hg)
        qg = None if queries is None else queries[:, g * queries.shape[1] // world:(g + 1) * queries.shape[1] // world]
        parts.append(fake_quantize(keys[:, heads], values[:, heads], config, qg, prompt_length))
    return torch.cat([k for k, _ in parts], 1), torch.cat([v for _, v in parts], 1)
