"""OScaRCache on tiny randomly initialised transformers models of 8 architectures.

The reference is a DynamicCache-like cache that hands attention ``cat(fake_quantize(history), new)``: the
numerics OScaR promises (DESIGN §2; a step's queries see the quantized past and their own tokens exactly),
computed by the model's own eager attention. The OScaR runs go through the ``"oscar"`` attention function.
"""

import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.cache_utils import Cache, DynamicLayer

from oscar_compile import OScaRConfig, fake_quantize
from oscar_compile.hf_cache import OScaRCache as _OScaRCache
from oscar_compile.hf_cache import OScaRLayer, cache_kwarg_name, use_oscar_attention, use_oscar_cache
from testing_utils import cache_arg
from oscar_compile.kv_tensor import cache_tensors, is_oscar_cache

def OScaRCache(*args, quantize_sliding=True, **kwargs):  # noqa: N802
    """These tests check the quantized path on every layer type, sliding-window layers included (the default
    keeps those in transformers' bf16 layer: tests/test_sliding_window.py)."""
    return _OScaRCache(*args, quantize_sliding=quantize_sliding, **kwargs)


# fixed key flags (the paper's): batch items stay independent; small blocks: a 70-token prompt quantizes two
CFG = OScaRConfig.paper(residual_length=32)
ATOL = 1e-4  # fp32 logits; observed differences are ~1e-6
COMMON = dict(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512,
)  # fmt: skip
ARCHS = {  # head_dim 64 (or hidden / heads = 32); mistral and gemma2 have 48-token sliding windows
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(head_dim=64)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict()),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=64)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(head_dim=64, sliding_window=48)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(pad_token_id=0)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(head_dim=64, sliding_window=48)),  # + logit softcap
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(num_attention_heads=2)),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, dict(head_dim=64)),
}
GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def tiny(arch, dtype=torch.float32):
    config_cls, model_cls, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    config = config_cls(**{**COMMON, **kwargs})
    return model_cls(config).to(dtype).eval(), config


class FakeQuantLayer(DynamicLayer):
    """Keeps the full-precision history; attention gets ``cat(fake_quantize(history), new)``."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        hist_k, hist_v = self.keys, self.values
        fk, fv = fake_quantize(hist_k, hist_v, CFG) if hist_k.shape[2] else (hist_k, hist_v)
        self.keys, self.values = torch.cat([hist_k, key_states], 2), torch.cat([hist_v, value_states], 2)
        return torch.cat([fk, key_states], 2), torch.cat([fv, value_states], 2)


class FakeQuantCache(Cache):
    def __init__(self, num_layers):
        super().__init__(layers=[FakeQuantLayer() for _ in range(num_layers)])


def reference(model):
    model.set_attn_implementation("eager")
    return model


def oscar(model):
    use_oscar_attention(model)
    return model


def run(model, cache, chunks, attention_mask=None):
    """Feed ``chunks`` (token tensors) one forward each; returns the logits of every call."""
    out, mask = [], attention_mask
    for ids in chunks:
        if mask is not None and out:
            mask = torch.cat([mask, mask.new_ones(ids.shape[0], ids.shape[1])], 1)
        kwargs = {} if mask is None else {"attention_mask": mask}
        kwargs[cache_kwarg_name(getattr(model, "_orig_mod", model))] = cache  # cache= on 5.2x (generate: past_key_values=)
        with torch.no_grad():
            out.append(model(ids, **kwargs).logits)
    return out


def chunks(seed=1, batch=1):
    gen = torch.Generator().manual_seed(seed)
    sizes = (70, 1, 1, 1, 20, 1)  # prompt, decode steps, a 20-token chunk (chunked prefill), decode
    return [torch.randint(1, 256, (batch, n), generator=gen) for n in sizes]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_fake_quant_reference(arch):
    model, config = tiny(arch)
    ref = run(reference(model), FakeQuantCache(config.num_hidden_layers), chunks())
    cache = OScaRCache(config, 128, CFG)
    got = run(oscar(model), cache, chunks())
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=0, atol=ATOL)
    assert cache.layers[0].keys.lengths.tolist() == [94] and not cache.kept_layers
    windows = [layer.window for layer in cache.layers]
    assert windows == {"mistral": [48, 48], "gemma2": [48, None]}.get(arch, [None, None])


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "phi3", "gemma2", "gpt_neox"])
def test_compiled_decode_fullgraph_no_graph_breaks(arch):
    model, config = tiny(arch)
    steps = chunks()[:4]
    ref = run(reference(model), FakeQuantCache(config.num_hidden_layers), steps)
    eager = run(oscar(model), OScaRCache(config, 128, CFG), steps)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    cache = OScaRCache(config, 128, CFG)
    got = run(model, cache, steps[:1])  # prefill eager, as transformers does
    got += [run(compiled, cache, [ids])[0] for ids in steps[1:]]
    for r, e, g in zip(ref, eager, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
        torch.testing.assert_close(g, r, rtol=0, atol=ATOL)
    assert not counters["graph_break"]
    # a new cache (generate() makes one per call) reuses the compiled decode graph
    cache = OScaRCache(config, 128, CFG)
    run(model, cache, steps[:1])
    torch.testing.assert_close(run(compiled, cache, steps[1:2])[0], eager[1], rtol=0, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # one decode graph, reused at every step and cache


def test_inductor_prefill_and_decode_with_left_padding():
    model, config = tiny("llama")
    oscar(model)
    steps = chunks(batch=2)[:3]
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :9] = 0  # int64 padding mask, as tokenizers return it
    eager = run(model, OScaRCache(config, 128, CFG), steps, mask)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    cache = OScaRCache(config, 128, CFG)
    got = run(compiled, cache, steps, mask)
    for e, g in zip(eager, got):
        torch.testing.assert_close(g[0], e[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(g[1, -1], e[1, -1], rtol=0, atol=1e-5)  # pad rows are arbitrary
    assert not counters["graph_break"]
    assert cache.layers[0].keys.lengths.tolist() == [72, 63] and cache.layers[0].keys.offsets.tolist() == [0, 9]


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2", "qwen2"])
def test_greedy_generate_matches_reference(arch):
    model, config = tiny(arch)
    prompt = chunks()[0]
    ref = reference(model).generate(prompt, **cache_arg(FakeQuantCache(2)), max_new_tokens=30, **GREEDY)
    got = oscar(model).generate(prompt, **cache_arg(OScaRCache(config, 100, CFG)), max_new_tokens=30, **GREEDY)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_batched_prompts_of_different_lengths_match_solo(arch):
    model, config = tiny(arch)
    oscar(model)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 256, (1, n), generator=gen) for n in (70, 37, 64)]
    solo = [model.generate(p, **cache_arg(OScaRCache(config, 128, CFG)), max_new_tokens=25, **GREEDY)[0, p.shape[1] :] for p in prompts]
    width = max(p.shape[1] for p in prompts)
    ids = torch.cat([torch.cat([torch.zeros(1, width - p.shape[1], dtype=torch.long), p], 1) for p in prompts])
    mask = torch.cat([(torch.arange(width) >= width - p.shape[1]).long()[None] for p in prompts])
    cache = OScaRCache(config, 128, CFG)
    batch = model.generate(ids, attention_mask=mask, **cache_arg(cache), max_new_tokens=25, **GREEDY)[:, width:]
    for b, s in enumerate(solo):
        assert torch.equal(batch[b], s), f"prompt {b}"
    assert cache.layers[0].keys.offsets.tolist() == [0, 33, 6]  # left pads skipped, never stored


def test_beam_search_matches_reference():
    model, config = tiny("llama")
    prompt = chunks()[0]
    beams = dict(num_beams=3, num_return_sequences=3, max_new_tokens=12, **GREEDY)
    ref = reference(model).generate(prompt, **cache_arg(FakeQuantCache(2)), **beams)
    got = oscar(model).generate(prompt, **cache_arg(OScaRCache(config, 96, CFG)), **beams)
    assert torch.equal(got, ref)


def test_reorder_cache_permutes_every_sequence_state():
    model, config = tiny("qwen3")
    oscar(model)
    steps = chunks(seed=5, batch=3)[:2]
    cache = OScaRCache(config, 128, CFG)
    run(model, cache, steps)
    beam_idx = torch.tensor([2, 0, 0])
    flags = ("key_rotated", "key_scaled")  # per head, not per sequence
    expected = [
        [t.clone() if n in flags else t[beam_idx].clone() for n, t in cache_tensors(layer.keys, layer.values)._asdict().items()]
        for layer in cache.layers
    ]
    cache.reorder_cache(beam_idx)
    for layer, want in zip(cache.layers, expected):
        for name, got, w in zip(cache_tensors(layer.keys, layer.values)._fields, cache_tensors(layer.keys, layer.values), want):
            assert torch.equal(got, w), name
        assert torch.equal(layer.values.lengths, layer.keys.lengths)
    # the reordered cache continues exactly like a cache built from the reordered prompts
    fresh = OScaRCache(config, 128, CFG)
    run(model, fresh, [s[beam_idx] for s in steps])
    nxt = torch.randint(1, 256, (3, 1))
    torch.testing.assert_close(run(model, cache, [nxt])[0], run(model, fresh, [nxt])[0], rtol=0, atol=1e-6)


def test_overflow_raises_eager_and_compiled():
    model, config = tiny("llama")
    oscar(model)
    cache = OScaRCache(config, 90, CFG)  # capacity rounds up to 96 positions
    assert cache.layers[0].max_cache_len == 96
    steps = chunks()
    run(model, cache, [steps[0], steps[4]])  # 90 positions, eager
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    run(compiled, cache, [steps[1]] * 6)  # 96
    with pytest.raises(ValueError, match="overflow"):  # the append op refuses inside the compiled step
        run(compiled, cache, steps[1:2])
    with pytest.raises(ValueError, match="overflow"):  # the host counter refuses before writing
        run(model, cache, steps[1:2])
    assert cache.layers[0].keys.lengths.tolist() == [96]


def test_reset_and_crop():
    model, config = tiny("olmo2")
    oscar(model)
    steps = chunks()
    cache = OScaRCache(config, 128, CFG)
    first = run(model, cache, steps[:3])
    cache.reset()
    assert cache.layers[0].keys.lengths.tolist() == [0] and int(cache.get_seq_length()) == 0
    again = run(model, cache, steps[:3])
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    cache.crop(-2)  # the last two tokens sit in the residual: they can be dropped and recomputed
    assert cache.layers[0].keys.lengths.tolist() == [70] and int(cache.get_seq_length()) == 70
    redo = run(model, cache, steps[1:3])
    torch.testing.assert_close(redo[-1], first[-1], rtol=0, atol=1e-6)
    with pytest.raises(NotImplementedError, match="quantized"):
        cache.crop(-10)  # 72 = 64 quantized + 8 residual


def test_only_the_first_step_after_allocation_or_reset_promises_an_empty_layer():
    """OScaRLayer hands out halves with ``stored_empty`` only for the step that starts on an empty layer
    (the kernels then skip the stored-token pass of a long prompt); every later step attends normally."""
    model, config = tiny("olmo2")
    oscar(model)
    steps = chunks()
    cache = OScaRCache(config, 128, CFG)
    layer = cache.layers[0]
    promised = []
    original = layer.update

    def spy(key_states, value_states, *args, **kwargs):
        empty_before = not layer.is_initialized or int(layer.keys.lengths.max()) == 0
        keys, values = original(key_states, value_states, *args, **kwargs)
        promised.append((keys.stored_empty, values.stored_empty, empty_before))
        return keys, values

    layer.update = spy
    run(model, cache, steps[:3])
    cache.reset()
    run(model, cache, steps[:2])
    assert [p[:2] for p in promised] == [(True, True), (False, False), (False, False), (True, True), (False, False)]
    assert all(empty for k, _, empty in promised if k)  # the promise is never made over stored tokens


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not is_oscar_cache(t):  # plain (materialized) tensors only
                self.seen.add((tuple(t.shape), t.dtype))
        return out


def test_memory_accounting_and_no_bf16_cache_allocated():
    model, config = tiny("llama", torch.bfloat16)
    oscar(model)
    max_len, batch = 256, 2
    cache = OScaRCache(config, max_len, CFG)
    with _Shapes() as shapes:
        run(model, cache, chunks(batch=batch)[:3])
    h, d, r, g = config.num_key_value_heads, config.head_dim, CFG.residual_length, CFG.group_size
    assert not any(shape[:1] == (batch,) and shape[-2:] == (max_len, d) for shape, _ in shapes.seen)
    # exact bytes, from the layout (2-bit codes + fp16 group params + fp32 norms + bf16 residual + counters)
    per_layer = (
        2 * batch * h * max_len * d // 4  # key and value codes
        + 2 * 2 * batch * h * (max_len // g) * d * 2  # key mn/scale + value mn/scale
        + batch * max_len * 4  # key norms
        + 2 * batch * h * r * d * 2  # residual keys/values (bf16)
        + 4 * batch * 4  # lengths and offsets of both halves
        + 2 * h  # per-head key flags
    )
    assert cache.nbytes() == config.num_hidden_layers * per_layer
    bf16 = config.num_hidden_layers * 2 * batch * h * max_len * d * 2
    report = cache.memory_report()
    assert report["static_cache_bytes"] == cache.bf16_nbytes() == bf16
    # 3.1x here (D=64, R=32, 256 positions: the full-precision residual weighs a lot); ~5.3x at long max_len
    assert report["ratio"] == bf16 / cache.nbytes() > 3
    # control: transformers' StaticCache does allocate the [B, Hkv, max_len, D] tensors the check looks for
    model.set_attn_implementation("sdpa")
    with _Shapes() as control:
        run(model, tf.StaticCache(config, max_len), chunks(batch=batch)[:1])
    assert ((batch, h, max_len, d), torch.bfloat16) in control.seen


def test_sliding_layers_kept_in_bf16_when_asked():
    model, config = tiny("gemma2")
    cache = OScaRCache(config, 128, CFG, quantize_sliding=False)
    assert cache.kept_layers == {0: "sliding_attention"} and not isinstance(cache.layers[0], OScaRLayer)
    out = oscar(model).generate(chunks()[0], **cache_arg(cache), max_new_tokens=8, **GREEDY)
    assert out.shape == (1, 78) and cache.memory_report()["kept_layers"] == {0: "sliding_attention"}


def test_use_oscar_cache_hook_makes_generate_use_it():
    model, config = tiny("qwen2")
    prompt = chunks()[0]
    explicit = oscar(model).generate(prompt, **cache_arg(OScaRCache(config, 90, CFG)), max_new_tokens=20, **GREEDY)
    use_oscar_cache(model, CFG)
    seen = []
    original = OScaRLayer.update

    def spy(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    OScaRLayer.update = spy
    try:
        hooked = model.generate(prompt, max_new_tokens=20, **GREEDY)
    finally:
        OScaRLayer.update = original
    assert torch.equal(hooked, explicit) and seen
    assert cache_kwarg_name(model) in ("cache", "past_key_values")


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_transformers_sdpa_attention_routes_through_the_subclass(arch):
    # attn_implementation "sdpa" (not "oscar"): repeat_kv / pack_gqa / key slicing and
    # F.scaled_dot_product_attention on the cache halves reach the same op through the subclass
    model, config = tiny(arch)
    steps = chunks(batch=2)[:4]
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :5] = 0
    want = run(oscar(model), OScaRCache(config, 128, CFG), steps, mask)
    model.set_attn_implementation("sdpa")
    got = run(model, OScaRCache(config, 128, CFG), steps, mask)
    for w, g in zip(want, got):
        torch.testing.assert_close(g[0], w[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(g[1, -1], w[1, -1], rtol=0, atol=1e-6)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    cache = OScaRCache(config, 128, CFG)
    single = chunks()[:3]
    run(model, cache, single[:1])
    got = [run(compiled, cache, [ids])[0] for ids in single[1:]]
    want = run(oscar(model), OScaRCache(config, 128, CFG), single)[1:]
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    assert not counters["graph_break"]


def test_generate_compiled_by_transformers_one_graph_across_calls():
    # transformers compiles the decode forward itself for a compileable cache (CPU needs _compile_all_devices)
    model, config = tiny("gemma2")
    oscar(model)
    prompt = chunks()[0]
    eager = model.generate(prompt, **cache_arg(OScaRCache(config, 128, CFG)), max_new_tokens=12, **GREEDY)
    compile_config = tf.CompileConfig(fullgraph=True, backend="aot_eager")
    compile_config._compile_all_devices = True
    model.generation_config.compile_config = compile_config
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):  # a fresh OScaRCache per call reuses the graph
        got = model.generate(prompt, **cache_arg(OScaRCache(config, 128, CFG)), max_new_tokens=12, **GREEDY)
        assert torch.equal(got, eager)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_head_dim_not_multiple_of_group_kept_in_transformers_layers():
    config_48 = tf.LlamaConfig(**{**COMMON, "head_dim": 48})
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config_48).eval()
    cache = OScaRCache(config_48, 128, CFG)
    assert not cache.oscar_layers and set(cache.kept_layers) == {0, 1}
    assert "head_dim 48" in cache.kept_layers[0]
    prompt = chunks()[0]
    want = model.generate(prompt, **cache_arg(tf.StaticCache(config_48, 128)), max_new_tokens=10, **GREEDY)
    got = oscar(model).generate(prompt, **cache_arg(cache), max_new_tokens=10, **GREEDY)
    assert torch.equal(got, want)
