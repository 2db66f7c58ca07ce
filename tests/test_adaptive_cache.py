"""The default ``OScaRConfig()`` ("auto" key rotation) in the real cache: flags decided at the first step.

Rule under test (``oscar_compile.kv_tensor``, "Adaptive key flags"): each layer's per-kv-head flags are
``choose_key_flags`` of its first step's keys and queries (left pads moved out of the way), written before
that step attends and appends, and never changed while the layer stores a token; ``reset`` decides afresh;
a batch shares one decision. The oracle is ``fake_quantize(history, OScaRConfig(), queries=prompt queries,
prompt_length=prompt length)``, which makes the same decision per sequence (so: batch 1).
"""

import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import oscar_compile.ops as oscar_ops
from oscar_compile import OScaRConfig, fake_quantize, ops
from oscar_compile.hf_cache import OScaRCache
from oscar_compile.kernels import choose_key_flags
from oscar_compile.kernels.key_transform import key_transform_errors
from oscar_compile.kv_tensor import kv_cache_from_hp, new_kv_cache
from test_hf_cache import ATOL, GREEDY, chunks, oscar, run, tiny
from testing_utils import cache_arg, randn

AUTO = OScaRConfig(residual_length=32)  # the default: rotate_keys="auto", keys scaled, values rotated
PAPER = OScaRConfig.paper(residual_length=32)
PROMPT = 70  # chunks()[0]: two complete blocks of 32 are quantized at the prompt


def test_default_config_is_the_adaptive_preset():
    assert OScaRConfig() == OScaRConfig.adaptive()
    assert (AUTO.rotate_keys, AUTO.rotate_values, AUTO.token_scaling) == ("auto", True, True)
    assert AUTO.initial_key_flags == (False, True) and PAPER.initial_key_flags == (True, True)


# ----------------------------------------------------------------------------------------------------
# the oracle: transformers' SDPA over cat(fake_quantize(history, decided from the prompt), new)

RECORDED: dict[int, torch.Tensor] = {}  # layer -> first step's queries (after RoPE), [B, Hq, T, D]


def _recording_sdpa(module, query, key, value, attention_mask, **kwargs):
    RECORDED.setdefault(module.layer_idx, query.detach().clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("record_sdpa", _recording_sdpa)
AttentionMaskInterface.register("record_sdpa", sdpa_mask)


class AutoOracleLayer(DynamicLayer):
    """Full-precision history; attention gets ``cat(fake_quantize(history, decided at the prompt), new)``."""

    def __init__(self, idx, config):
        super().__init__()
        self.idx, self.config, self.prompt_length = idx, config, None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
            self.prompt_length = key_states.shape[2]
        hk, hv = self.keys, self.values
        fk, fv = hk, hv
        if hk.shape[2]:
            fk, fv = fake_quantize(hk, hv, self.config, queries=RECORDED[self.idx], prompt_length=self.prompt_length)
        self.keys, self.values = torch.cat([hk, key_states], 2), torch.cat([hv, value_states], 2)
        return torch.cat([fk, key_states], 2), torch.cat([fv, value_states], 2)


def oracle(model, config, steps, num_layers=2, attention_mask=None):
    """Logits of the oracle, and per layer the prompt's (keys, queries)."""
    RECORDED.clear()
    model.set_attn_implementation("record_sdpa")
    cache = Cache(layers=[AutoOracleLayer(i, config) for i in range(num_layers)])
    logits = run(model, cache, steps, attention_mask)
    prompt = [(layer.keys[:, :, : steps[0].shape[1]], RECORDED[i]) for i, layer in enumerate(cache.layers)]
    return logits, prompt


class ChoiceCounter:
    """Counts the runs of the key-transform choice (patched where the op calls it)."""

    def __init__(self, monkeypatch):
        self.calls = 0

        def counted(*args, **kwargs):
            self.calls += 1
            return choose_key_flags(*args, **kwargs)

        monkeypatch.setattr(oscar_ops, "_choose_key_flags", counted)


def assert_flags(cache, prompt, config):
    for layer, (k, q) in zip(cache.layers, prompt):
        want = choose_key_flags(k, config.bits, config.group_size, queries=q, rotate=config.rotate_keys,
                                scale=config.token_scaling)  # fmt: skip
        assert torch.equal(layer.keys.key_rotated, want[0]) and torch.equal(layer.keys.key_scaled, want[1])


# inductor on llama only: its compile time on the 2-core CI box
@pytest.mark.parametrize("arch,mode", [("llama", "eager"), ("qwen2", "eager"), ("llama", "aot_eager"),
                                       ("qwen2", "aot_eager"), ("llama", "inductor")])  # fmt: skip
def test_auto_cache_matches_fake_quantize_oracle(arch, mode, monkeypatch):
    model, config = tiny(arch)
    steps = chunks()  # prompt 70, decode x3, a 20-token chunk, decode
    want, prompt = oracle(model, AUTO, steps)
    oscar(model)
    fn = model
    if mode != "eager":
        torch._dynamo.reset()
        counters.clear()
        fn = torch.compile(model, fullgraph=True, backend=mode)  # the deciding prefill is compiled too
    count = ChoiceCounter(monkeypatch)
    cache = OScaRCache(config, 128, AUTO)
    got = [run(fn, cache, [ids])[0] for ids in steps[:1]]
    assert count.calls == config.num_hidden_layers  # one decision per layer, at the prompt
    got += [run(fn, cache, [ids])[0] for ids in steps[1:]]
    assert count.calls == config.num_hidden_layers  # decode steps and the later chunk never choose again
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=0, atol=ATOL, msg=lambda m: f"step {i}: {m}")
    assert_flags(cache, prompt, AUTO)
    assert all(layer.keys_decided for layer in cache.layers)
    if mode != "eager":
        assert not counters["graph_break"]
        # deciding prefill, decode, the 20-token chunk: one extra graph at most for the decision
        assert counters["stats"]["unique_graphs"] <= 3


def test_auto_decides_per_head_and_the_flags_change_the_numerics():
    # Qwen2.5-like outlier key channels (DESIGN §2.8): layer 0, kv head 0 gets two key channels 20x larger
    # (the lowest-frequency RoPE pair, so they stay outliers after RoPE). The rule keeps that head unrotated.
    model, config = tiny("qwen2")
    d = config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        for c in (d // 2 - 1, d - 1):
            model.model.layers[0].self_attn.k_proj.weight[c] *= 20
    steps = chunks()
    want, prompt = oracle(model, AUTO, steps)
    oscar(model)
    auto_cache = OScaRCache(config, 128, AUTO)
    got = run(model, auto_cache, steps)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=ATOL)
    assert_flags(auto_cache, prompt, AUTO)
    assert not auto_cache.layers[0].keys.key_rotated[0]
    k, q = prompt[0]  # the errors behind the choice: rotating that head's keys costs more
    e = key_transform_errors(k, 2, 32, queries=q, candidates=((False, True), (True, True)))
    assert e[1, 0] > e[0, 0], e
    # the paper's config (every head rotated) reads other numbers from the same model and tokens
    paper = run(model, OScaRCache(config, 128, PAPER), steps)
    assert max((a - p).abs().max().item() for a, p in zip(got[1:], paper[1:])) > 100 * ATOL


def test_batch_shares_one_decision():
    # Rule: a batch under "auto" decides once per layer, from all its prompts jointly (the left-padded keys
    # moved to slot 0, pad queries zeroed): so a prompt batched with others may get other flags than alone.
    model, config = tiny("llama")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 256, (1, n), generator=gen) for n in (70, 45)]
    width = 70
    ids = torch.cat([torch.cat([torch.zeros(1, width - p.shape[1], dtype=torch.long), p], 1) for p in prompts])
    mask = torch.cat([(torch.arange(width) >= width - p.shape[1]).long()[None] for p in prompts])
    _, prompt = oracle(model, AUTO, [ids], attention_mask=mask)
    oscar(model)
    cache = OScaRCache(config, 128, AUTO)
    run(model, cache, [ids], mask)
    skip = torch.tensor([0, width - 45], dtype=torch.int32)
    for layer, (k, q) in zip(cache.layers, prompt):
        want = ops.choose_key_flags(k, q, skip, 2, 32, "auto", True)
        assert torch.equal(layer.keys.key_rotated, want[0]) and torch.equal(layer.keys.key_scaled, want[1])
    # the same prompt twice decides as it does alone, so each row then matches the solo run exactly
    p = prompts[0]
    solo = model.generate(p, **cache_arg(OScaRCache(config, 128, AUTO)), max_new_tokens=20, **GREEDY)
    twice = model.generate(torch.cat([p, p]), **cache_arg(OScaRCache(config, 128, AUTO)), max_new_tokens=20, **GREEDY)
    assert torch.equal(twice[0], solo[0]) and torch.equal(twice[1], solo[0])


def test_reset_decides_afresh_and_bare_halves_keep_their_first_decision():
    model, config = tiny("llama")
    oscar(model)
    first, second = chunks(seed=1), chunks(seed=7)
    cache = OScaRCache(config, 128, AUTO)
    run(model, cache, first[:2])
    cache.reset()
    assert not any(layer.keys_decided for layer in cache.layers)
    assert all(layer.keys.key_rotated.tolist() == [False, False] for layer in cache.layers)  # initial flags
    again = run(model, cache, second[:3])
    fresh_cache = OScaRCache(config, 128, AUTO)
    fresh = run(model, fresh_cache, second[:3])
    for a, b in zip(again, fresh):
        assert torch.equal(a, b)
    for a, b in zip(cache.layers, fresh_cache.layers):
        assert torch.equal(a.keys.key_rotated, b.keys.key_rotated)

    # bare halves (no OScaRLayer): the device-side check keeps the first step's flags for good
    b, h, d = 1, 2, 64
    kc, vc = new_kv_cache(b, h, 256, d, AUTO, torch.float32)
    k0, v0, q0 = randn((b, h, 40, d), seed=1), randn((b, h, 40, d), seed=2), randn((b, 2 * h, 40, d), seed=3)
    kc.index_copy_(2, torch.arange(40), k0)
    vc.index_copy_(2, torch.arange(40), v0)
    ops.sdpa(q0, kc, vc)
    want = choose_key_flags(k0, 2, 32, queries=q0, rotate="auto", scale=True)
    assert torch.equal(kc.key_rotated, want[0]) and torch.equal(kc.key_scaled, want[1])
    k1 = randn((b, h, 64, d), seed=4)
    k1[:, 0, :, 0] *= 50  # a chunk whose own choice for head 0 would differ
    k1[:, 1] = randn((b, 1, 64, d), seed=5) * torch.linspace(0.01, 3, 64)[:, None]
    kc.index_copy_(2, torch.arange(40, 104), k1)
    vc.index_copy_(2, torch.arange(40, 104), randn((b, h, 64, d), seed=6))
    ops.sdpa(randn((b, 2 * h, 64, d), seed=7), kc, vc)
    assert torch.equal(kc.key_rotated, want[0]) and torch.equal(kc.key_scaled, want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hp_decides_from_the_history_like_fake_quantize(dtype):
    k = randn((1, 2, 75, 64), dtype, seed=4, scale=3.0)
    k[:, 1, :, 5] *= 30  # head 1: one outlier channel
    v = randn((1, 2, 75, 64), dtype, seed=5)
    kc, vc = kv_cache_from_hp(k, v, AUTO, 100)
    assert kc.key_decision is None and vc.key_decision is None
    want = choose_key_flags(k, 2, 32, rotate="auto", scale=True)
    assert torch.equal(kc.key_rotated, want[0])
    fk, fv = fake_quantize(k, v, AUTO, prompt_length=75)
    tol = dict(rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
    torch.testing.assert_close(kc.dequantize()[:, :, :75], fk, **tol)
    torch.testing.assert_close(vc.dequantize()[:, :, :75], fv, **tol)


def test_oscar_compile_generate_with_the_default_config():
    # oscar.compile (Inductor, prefill compiled too) with OScaRConfig()'s "auto" flags, through generate()
    import oscar_compile as oscar

    model, config = tiny("llama")
    reference, _ = tiny("llama")
    torch._dynamo.reset()
    counters.clear()
    oscar.compile(model, AUTO, fullgraph=True)
    prompt = chunks()[0]
    out = model.generate(prompt, max_new_tokens=4, output_logits=True, return_dict_in_generate=True, **GREEDY)
    assert not counters["graph_break"] and "key flags: 'auto'" in str(model.oscar_report)
    seq = out.sequences
    steps = [seq[:, :PROMPT]] + [seq[:, i : i + 1] for i in range(PROMPT, seq.shape[1] - 1)]
    want, _ = oracle(reference, AUTO, steps)
    for i, (g, w) in enumerate(zip(out.logits, want)):
        torch.testing.assert_close(g, w[:, -1], rtol=0, atol=ATOL, msg=lambda m: f"step {i}: {m}")
    torch._dynamo.reset()
