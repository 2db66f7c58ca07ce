"""Bits budget (``OScaRConfig(bits=2.5)``): allocation, predictor, and per-layer bits in every backend."""

import math

import pytest
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import oscar_compile as oscar
from oscar_compile import OScaRConfig, fake_quantize
from oscar_compile.bit_budget import allocate_layer_bits, combine_ranks, layer_damage, num_four_bit, plan_layer_bits
from oscar_compile.eval import KVMethod, bits_per_element, make_cache
from oscar_compile.eval.caches import FakeQuantCache
from oscar_compile.hf_cache import OScaRCache, cache_kwarg_name, use_oscar_attention, use_oscar_cache

scores_st = st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=64)
budget_st = st.floats(2.0, 4.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(scores=scores_st, budget=budget_st)
def test_allocation_honours_the_budget_exactly(scores, budget):
    bits = allocate_layer_bits(scores, budget)
    n4 = bits.count(4)
    assert set(bits) <= {2, 4} and len(bits) == len(scores)
    assert n4 == num_four_bit(budget, len(scores))
    assert sum(bits) / len(bits) <= budget + 1e-12  # never over the budget
    assert 2 + 2 * (n4 + 1) / len(bits) > budget - 1e-9 or n4 == len(bits)  # as many 4-bit layers as fit
    four = [s for s, b in zip(scores, bits) if b == 4]
    two = [s for s, b in zip(scores, bits) if b == 2]
    assert not four or not two or min(four) >= max(two)  # the most damaged layers get 4 bits
    assert allocate_layer_bits(list(scores), budget) == bits  # deterministic


@settings(max_examples=30, deadline=None)
@given(scores=scores_st, budget=budget_st, seed=st.integers(0, 2**16))
def test_allocation_follows_the_layers_under_a_permutation(scores, budget, seed):
    # ties go to the earlier layer, so make scores distinct; then the allocation moves with its layer
    scores = [s + i * 1e-3 for i, s in enumerate(scores)]
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed)).tolist()
    bits = allocate_layer_bits(scores, budget)
    permuted = allocate_layer_bits([scores[p] for p in perm], budget)
    assert permuted == tuple(bits[p] for p in perm)


@settings(max_examples=30, deadline=None)
@given(a=st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=40, unique=True), seed=st.integers(0, 99))
def test_rank_sum_of_two_predictors(a, seed):
    b = torch.rand(len(a), generator=torch.Generator().manual_seed(seed)).tolist()
    ranks = combine_ranks(list(zip(a, b)))
    assert sorted(ranks) != [] and sum(ranks) == len(a) * (len(a) - 1)  # each predictor ranks 0 .. L-1 once
    only_a = combine_ranks([(x,) for x in a])
    assert sorted(range(len(a)), key=lambda i: only_a[i]) == sorted(range(len(a)), key=lambda i: a[i])
    agree = combine_ranks(list(zip(a, a)))  # two views that agree: the same order as either
    assert [2 * r for r in only_a] == agree


@pytest.mark.parametrize("layers, want", [(30, {2.25: 3, 2.5: 7, 3.0: 15}), (24, {2.25: 3, 2.5: 6, 3.0: 12})])
def test_both_models_layer_counts(layers, want):
    # SmolLM2-135M (30 layers) and Qwen2.5-0.5B (24): exact code bits per element of each budget
    for budget, n4 in want.items():
        assert num_four_bit(budget, layers) == n4
        method = KVMethod("b", "oscar", OScaRConfig(bits=budget), 2)
        code = 2 + 2 * n4 / layers
        assert code <= budget and math.isclose(bits_per_element(method, 3, 64, layers), code + 1 + 32 / (2 * 3 * 64))


def test_config_api():
    c = OScaRConfig(bits=2.5)
    assert c.is_budget and c.needs_allocation and c.bits == 2.5 and OScaRConfig(bits=3).bits == 3.0
    assert OScaRConfig(bits=4).bits == 4 and not OScaRConfig(bits=4).is_budget
    with pytest.raises(ValueError, match="not decided"):
        c.layer(0)
    with pytest.raises(ValueError, match="own format"):
        _ = c.cache_format
    d = c.with_layer_bits([4, 2, 2, 2])
    assert d.layer_bits == (4, 2, 2, 2) and d.mean_code_bits == 2.5
    assert d.layer(0) == OScaRConfig(bits=4) and d.layer(1).cache_format.bits == 2
    with pytest.raises(ValueError, match="over the budget"):
        c.with_layer_bits([4, 4, 2, 2])
    with pytest.raises(ValueError, match="layer_bits"):
        OScaRConfig(bits=2.5, layer_bits=(3, 2))
    with pytest.raises(ValueError, match="disagrees"):
        OScaRConfig(bits=2, layer_bits=(4, 2))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.sampled_from([20, 64, 96]))
def test_predictor_properties(seed, t):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(1, 2, t, 64, generator=g), torch.randn(1, 2, t, 64, generator=g)
    q = torch.randn(1, 4, 8, 64, generator=g)
    cfg = OScaRConfig()
    d2, d4 = layer_damage(k, v, q, cfg), layer_damage(k, v, q, cfg, bits=4)
    if t < cfg.group_size:
        assert d2 == d4 == 0.0
    else:
        assert d2 > d4 > 0 and layer_damage(k, v, q, cfg) == d2  # 4 bits damage less; deterministic
        assert math.isclose(layer_damage(k, 2 * v, q, cfg), 4 * d2, rel_tol=1e-3)  # absolute: scales with V²


def test_fake_quantize_takes_each_layers_bits():
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 160, 64), torch.randn(1, 2, 160, 64)
    cfg = OScaRConfig.paper(bits=3.0, layer_bits=(4, 2))
    for i, bits in enumerate((4, 2)):
        got = fake_quantize(k, v, cfg, layer=i)
        want = fake_quantize(k, v, OScaRConfig.paper(bits=bits))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="layer=i"):
        fake_quantize(k, v, cfg)


def _tiny_llama():
    config = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval(), config


def _run(model, cache, chunks):
    out = []
    with torch.no_grad():
        for ids in chunks:
            out.append(model(ids, **{cache_kwarg_name(model): cache}).logits)
    return out


def test_cache_holds_each_layers_bits_and_reports_them():
    model, config = _tiny_llama()
    cfg = OScaRConfig.paper(bits=3.0, residual_length=32, layer_bits=(4, 2))
    steps = [torch.randint(1, 256, (1, n), generator=torch.Generator().manual_seed(n)) for n in (70, 1, 1, 20)]
    ref = _run(model, FakeQuantCache(KVMethod("b", "oscar", cfg), 2, store_dtype=None), steps)
    use_oscar_attention(model)
    cache = OScaRCache(config, 128, cfg)
    got = _run(model, cache, steps)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-4)
    assert [la.keys.bits for la in cache.layers] == [4, 2] == [la.keys.fmt.bits for la in cache.layers]
    rep = cache.memory_report()
    slots = 2 * 1 * 2 * 128 * 32 * 2  # K and V, batch 1, 2 kv heads, 128 slots, head_dim 32, 2 layers
    assert rep["layer_bits"] == {0: 4, 1: 2} and rep["bits_per_element"] == 8 * rep["oscar_bytes"] / slots
    codes = [la.keys.key_codes.numel() + la.values.value_codes.numel() for la in cache.layers]
    assert codes[0] == 2 * codes[1]  # 4-bit codes take twice the bytes
    with pytest.raises(ValueError, match="not decided"):
        _run(model, OScaRCache(config, 128, OScaRConfig(bits=3.0)), steps[:1])


def test_generate_plans_the_budget_from_the_prompt():
    model, config = _tiny_llama()
    prompt = torch.randint(1, 256, (1, 70), generator=torch.Generator().manual_seed(3))
    cfg = OScaRConfig(bits=3.0, residual_length=32)
    want = plan_layer_bits(model, prompt, cfg)
    assert want.layer_bits.count(4) == 1 and plan_layer_bits(model, prompt, cfg) == want  # deterministic
    use_oscar_cache(model, cfg)
    model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert model.generate.cache.oscar_config == want
    assert [la.keys.bits for la in model.generate.cache.layers] == list(want.layer_bits)


def test_eval_cache_decides_from_the_seeded_prompt():
    model, config = _tiny_llama()
    from oscar_compile.eval import prefill

    kv, _ = prefill(model, torch.randint(1, 256, (2, 70), generator=torch.Generator().manual_seed(5)))
    cfg = OScaRConfig(bits=3.0, residual_length=32)
    cache = make_cache(KVMethod("b", "oscar", cfg), config, kv)
    bits = cache.layer_bits()
    assert len(bits) == 2 and all(b.count(4) == 1 for b in bits)
    for s in range(2):  # each sequence decides as it would alone
        solo = make_cache(KVMethod("b", "oscar", cfg), config, [tuple(x[s:s + 1] for x in e) for e in kv])
        assert solo.layer_bits()[0] == bits[s]


def test_graph_pass_gives_each_cache_its_layers_bits():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "passes"))
    from pass_helpers import attr, decode_steps
    from pass_models import Decoder

    torch.manual_seed(0)
    model = Decoder().eval()
    cfg = OScaRConfig.paper(bits=3.0, residual_length=32, layer_bits=(2, 4))
    steps = decode_steps()
    ref_model = Decoder().eval()
    ref_model.load_state_dict(model.state_dict())
    compiled = oscar.compile(model, cfg, fullgraph=True, dynamic=False)
    with torch.no_grad():
        outs = [compiled(x, pos) for x, pos in steps]
    names = [n.split("/") for n in compiled.oscar_report.caches]
    assert [attr(compiled, k).bits for k, _ in names] == [2, 4]
    report = compiled.oscar_report
    halves = [attr(compiled, n) for pair in names for n in pair]
    assert report.kv_bytes_oscar == sum(h.nbytes_quantized() for h in halves)  # the report counts what is held
    assert report.kv_slots == 2 * sum(h.residual_keys.numel() // h.residual_keys.shape[2] * h.capacity
                                      for h in halves[::2])
    assert f"{8 * report.kv_bytes_oscar / report.kv_slots:.2f} bits per element held, code bits 3 (4 in 1 of 2" in str(report)
    # reference: each layer's history fake-quantized with its own bits, attend-then-append
    pairs = names
    hist = {n: torch.zeros_like(attr(ref_model, n)) for p in pairs for n in p}
    stored = 0
    with torch.no_grad():
        for (x, pos), got in zip(steps, outs):
            if int(pos[0]) == 0:
                stored = 0
            for i, (kn, vn) in enumerate(pairs):
                kh, vh = fake_quantize(hist[kn][:, :, :stored], hist[vn][:, :, :stored], cfg, layer=i)
                attr(ref_model, kn)[:, :, :stored], attr(ref_model, vn)[:, :, :stored] = kh, vh
            want = ref_model(x, pos)
            for n in hist:
                hist[n][:, :, pos] = attr(ref_model, n)[:, :, pos]
            stored = int(pos[-1]) + 1
            torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
