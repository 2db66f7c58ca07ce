"""Sliding-window layers by default stay in transformers' own window-sized layer; global layers are OScaR."""

import pytest
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.cache_utils import StaticCache, StaticSlidingWindowLayer

from oscar_compile import OScaRConfig
from oscar_compile.eval import KVMethod
from oscar_compile.eval.caches import FakeQuantCache
from oscar_compile.hf_cache import OScaRCache, OScaRLayer, cache_kwarg_name, use_oscar_attention

CFG = OScaRConfig.paper(residual_length=32)
COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, head_dim=32, sliding_window=48)
ARCHS = {
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {}),  # layer 0 sliding, layer 1 global
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),  # every layer sliding
    "qwen2-gemma3-style": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
                           dict(num_hidden_layers=3, layer_types=["sliding_attention"] * 2 + ["full_attention"],
                                use_sliding_window=True)),
}


def _tiny(arch):
    cls_cfg, cls, extra = ARCHS[arch]
    config = cls_cfg(**{**COMMON, **extra})
    torch.manual_seed(0)
    return cls(config).eval(), config


def _run(model, cache, chunks):
    with torch.no_grad():
        return [model(ids, **{cache_kwarg_name(model): cache}).logits for ids in chunks]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_keeps_window_layers_and_matches_the_reference(arch):
    model, config = _tiny(arch)
    gen = torch.Generator().manual_seed(1)
    steps = [torch.randint(1, 256, (1, n), generator=gen) for n in (70, 1, 1, 20, 1)]  # past the 48-token window
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers  # Mistral
    hybrid = "full_attention" in types  # window layers beside global ones are kept; a model of windows only quantized
    quantized = [i for i, t in enumerate(types) if t == "full_attention" or not hybrid]
    ref_cache = FakeQuantCache(KVMethod("default", "oscar", CFG, 2), len(types), None, quantized)
    ref = _run(model, ref_cache, steps)
    use_oscar_attention(model)
    cache = OScaRCache(config, 128, CFG)
    got = _run(model, cache, steps)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-4)
    kept = [i for i in range(len(types)) if i not in quantized]
    assert cache.kept_layers == {i: "sliding_attention" for i in kept}
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, StaticSlidingWindowLayer if i in kept else OScaRLayer)
        assert not isinstance(layer, OScaRLayer) or layer.window == (None if types[i] == "full_attention" else 48)
    assert (_run(model, OScaRCache(config, 128, CFG.replace(bits=4)), steps)[-1] - got[-1]).norm() > 0  # quantized


@settings(max_examples=6, deadline=None)
@given(length=st.integers(1, 3000), window=st.sampled_from([48, 512]))
def test_default_holds_no_more_than_transformers_window_layers(length, window):
    # Gemma-3 style: 5 of 6 layers slide; bytes compared with transformers' own StaticCache, layer by layer
    types = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(6)]
    config = tf.Qwen2Config(**{**COMMON, "num_hidden_layers": 6, "sliding_window": window, "layer_types": types,
                               "use_sliding_window": True})
    ours = OScaRCache(config, length, OScaRConfig())
    theirs = StaticCache(config=config, max_cache_len=length)
    for c in (ours, theirs):
        c.early_initialization(1, 2, 32, torch.bfloat16, "cpu")

    def held(layer):
        if isinstance(layer, OScaRLayer):
            return layer.nbytes()
        return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))

    for i, kind in enumerate(types):
        if kind == "sliding_attention":
            assert held(ours.layers[i]) == held(theirs.layers[i])  # transformers' window-sized layer itself
    report = ours.memory_report()
    assert report["oscar_bytes"] == sum(held(la) for la in ours.layers)  # the report counts what is held
    assert report["static_cache_bytes"] == sum(held(la) for la in theirs.layers)
    assert report["kept_layers"] == {i: "sliding_attention" for i, k in enumerate(types) if k != "full_attention"}
    quantized = OScaRCache(config, length, OScaRConfig(), quantize_sliding=True)
    quantized.early_initialization(1, 2, 32, torch.bfloat16, "cpu")
    if length >= 8 * window:  # a quantized whole history outgrows a bf16 window (~5.3 windows at 3 bits)
        assert report["oscar_bytes"] < quantized.memory_report()["oscar_bytes"]
