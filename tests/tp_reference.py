"""Single-process references for the tensor-parallel tests (tests/test_tensor_parallel.py, tests/tp_worker.py).

:class:`RankGroupCache`: one process, ``world`` OScaR layers per model layer, one per group of ``Hkv / world``
consecutive kv heads, attended with the group's query heads: exactly the state ``world`` TP ranks hold
(module docstring of ``oscar_compile.tensor_parallel``: per-rank key norm, per-rank "auto" decision), built
from the product's own ``OScaRLayer`` and attention function. ``world=1`` is a plain ``OScaRCache``.
"""

from __future__ import annotations

import functools

import torch
import transformers as tf
from transformers.cache_utils import Cache, CacheLayerMixin

from oscar_compile.hf_cache import OScaRCache, OScaRLayer, oscar_attention_forward

# tiny models: fp32, head_dim 32 (one group of channels), 2 or 4 kv heads (1 or 2 per rank at W=2)
COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, max_position_embeddings=512)
ARCHS = {
    "llama": (tf.LlamaConfig, dict(num_attention_heads=8, num_key_value_heads=4, head_dim=32)),
    "qwen2": (tf.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),  # QKV bias
    "mistral": (tf.MistralConfig, dict(num_attention_heads=8, num_key_value_heads=4, head_dim=32, sliding_window=48)),
}


def save_tiny(arch: str, path) -> None:
    """A random-init tiny model of ``arch`` (seed 0) saved to ``path`` (loaded with ``tp_plan="auto"`` by ranks)."""
    config_cls, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config_cls(**COMMON, **kwargs))
    model.save_pretrained(path)


class RankGroupLayer(CacheLayerMixin):
    """``world`` :class:`OScaRLayer` s standing for one layer split over ``world`` ranks by kv heads."""

    is_compileable = False

    def __init__(self, world: int, max_cache_len: int, config, window=None):
        super().__init__()
        self.parts = [OScaRLayer(max_cache_len, config, window=window) for _ in range(world)]
        self.is_sliding = window is not None

    def lazy_initialization(self, key_states, value_states) -> None:  # the parts allocate on their first update
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        w = len(self.parts)
        h = key_states.shape[1] // w
        outs = [p.update(key_states[:, g * h:(g + 1) * h].contiguous(), value_states[:, g * h:(g + 1) * h].contiguous(),
                         *args, **kwargs) for g, p in enumerate(self.parts)]  # fmt: skip
        self.is_initialized = True
        return RankGroups(o[0] for o in outs), RankGroups(o[1] for o in outs)

    def get_mask_sizes(self, *args, **kwargs):
        return self.parts[0].get_mask_sizes(*args, **kwargs)

    def get_seq_length(self, *args):
        return self.parts[0].get_seq_length(*args)

    def get_max_length(self) -> int:
        return self.parts[0].get_max_length()

    def reset(self) -> None:
        for p in self.parts:
            p.reset()

    def reorder_cache(self, beam_idx) -> None:
        for p in self.parts:
            p.reorder_cache(beam_idx)


class RankGroups(tuple):
    """The per-group cache halves of one layer, handed from ``update`` to :func:`rank_group_attention`."""


class RankGroupCache(Cache):
    """An :class:`OScaRCache`'s layout with every OScaR layer split into ``world`` head groups."""

    def __init__(self, config, max_cache_len: int, oscar_config, world: int, **cache_kwargs):
        layers = OScaRCache(config, max_cache_len, oscar_config, **cache_kwargs).layers
        super().__init__(layers=[
            RankGroupLayer(world, max_cache_len, layer.config, layer.window) if isinstance(layer, OScaRLayer) else layer
            for layer in layers
        ])

    def groups(self, i: int) -> list[OScaRLayer]:
        return self.layers[i].parts


def rank_group_attention(module, query, key, value, attention_mask, **kwargs):
    """``oscar_attention_forward`` per head group (query heads split like the kv heads, as column sharding does)."""
    if not isinstance(key, RankGroups):
        return oscar_attention_forward(module, query, key, value, attention_mask, **kwargs)
    w = len(key)
    hq = query.shape[1] // w
    outs = [oscar_attention_forward(module, query[:, g * hq:(g + 1) * hq], key[g], value[g], attention_mask, **kwargs)[0]
            for g in range(w)]  # fmt: skip
    return torch.cat(outs, dim=2), None


@functools.lru_cache(maxsize=None)
def register_rank_group_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("oscar_rank_groups", rank_group_attention)
    AttentionMaskInterface.register("oscar_rank_groups", sdpa_mask)
    return "oscar_rank_groups"


def chunk_ids(seed=1, batch=1, sizes=(70, 1, 1, 20, 1)):
    """Token chunks fed one forward each: a prompt, decode steps, a 20-token chunk (chunked prefill), decode."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (batch, n), generator=gen) for n in sizes]


def run_chunks(model, cache, chunks, attention_mask=None) -> list[torch.Tensor]:
    """Feed ``chunks`` one forward each through ``cache``; the logits of every call (fp32)."""
    out, mask = [], attention_mask
    for ids in chunks:
        if mask is not None and out:
            mask = torch.cat([mask, mask.new_ones(ids.shape[0], ids.shape[1])], 1)
        kwargs = {} if mask is None else {"attention_mask": mask}
        with torch.no_grad():
            out.append(model(ids, cache=cache, **kwargs).logits.float())
    return out
