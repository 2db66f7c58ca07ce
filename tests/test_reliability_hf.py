"""Reliability of the Hugging Face route (``use_oscar_cache``, the hook ``oscar.compile`` installs): the rows of
the reliability issue about generate() and transformers models (4, 5, 6, 7, 9, 11, 12, 13, 14, 15, 17).

References are the same tiny randomly initialised models run plainly (transformers' own caches and attention)
or with an explicit :class:`OScaRCache` passed to ``generate`` (the OScaR numerics, checked against
``fake_quantize`` in test_hf_cache.py).
"""

import copy
import io
import warnings

import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters

import oscar_compile as oscar
from oscar_compile import OScaRConfig
from oscar_compile.hf_cache import (
    OScaRCache,
    OScaRGenerate,
    cache_kwarg_name,
    hf_unsupported_reason,
    use_oscar_attention,
    use_oscar_cache,
)
from oscar_compile.passes import OScaRBackend

CFG = OScaRConfig.paper(residual_length=32)  # fixed key flags, small blocks: short prompts quantize whole blocks
GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
SMALL = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=512,
)  # fmt: skip  (head_dim 32: one channel group)


def tiny(config_cls=tf.LlamaConfig, model_cls=tf.LlamaForCausalLM, seed=0, **overrides):
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**SMALL, **overrides})).eval()


def prompt(n=40, seed=1, batch=1):
    return torch.randint(1, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def oscar_reference(model, ids, max_cache_len, **kwargs):
    """``generate`` on a deep copy of ``model`` with an explicit OScaRCache (the OScaR numerics)."""
    ref = copy.deepcopy(model)
    for name in ("generate", "_prepare_cache_for_generation"):
        ref.__dict__.pop(name, None)
    ref._compiled_call_impl = None  # eager
    use_oscar_attention(ref)
    cache = OScaRCache(ref.config, max_cache_len, CFG)
    return ref.generate(ids, **{cache_kwarg_name(ref): cache}, **GREEDY, **kwargs)


def assert_same_generation(got, want):
    assert torch.equal(got.sequences, want.sequences)
    for i, (g, w) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=lambda m: f"step {i}: {m}")


# ---------------------------------------------------------------------------------------------------
# row 4: generate() twice with lengths in different blocks; a second compiled model


def _check_lengths(model, lengths):
    ids = prompt(20)
    for new in lengths:
        got = model.generate(ids, max_new_tokens=new, **GREEDY)
        want = oscar_reference(model, ids, 20 + new, max_new_tokens=new)
        assert torch.equal(got, want), f"max_new_tokens={new}"


def test_compiled_generate_lengths_in_different_blocks_and_a_second_model():
    torch._dynamo.reset()
    counters.clear()
    models = []
    for seed in (0, 1):
        model = use_oscar_cache(tiny(seed=seed), CFG)
        model.compile(backend="aot_eager")  # what oscar.compile does, without Inductor's compile time
        models.append(model)
        # 39 positions, then 79 (more blocks; past twice 39: a new capacity), then 39 again (the kept cache, reset)
        _check_lengths(model, (20, 60, 20))
    # caches the caller passes, of other lengths, on the same compiled model
    ids = prompt(20)
    for new in (100, 20, 50):
        cache = OScaRCache(models[1].config, 20 + new, CFG)
        got = models[1].generate(ids, **{cache_kwarg_name(models[1]): cache}, max_new_tokens=new, **GREEDY)
        assert torch.equal(got, oscar_reference(models[1], ids, 20 + new, max_new_tokens=new))
    assert not counters["graph_break"]
    kept = models[0].generate.cache
    models[0].generate(prompt(20), max_new_tokens=10, **GREEDY)
    assert models[0].generate.cache is kept  # fits: reused, no new allocation, same shapes for the graphs


def test_generate_keeps_one_cache_and_grows_it_geometrically():
    model = use_oscar_cache(tiny(), CFG)
    ids = prompt(20)
    model.generate(ids, max_new_tokens=20, **GREEDY)  # 39 positions
    first = model.generate.cache
    assert isinstance(first, OScaRCache) and first.capacity == 39 and first.max_cache_len == 39
    model.generate(ids, max_new_tokens=40, **GREEDY)  # 59 positions: 2 x 39 = 78
    grown = model.generate.cache
    assert grown is not first and grown.capacity == 78
    model.generate(ids, max_new_tokens=5, **GREEDY)
    assert model.generate.cache is grown and grown.max_cache_len == 59  # static-cache accounting: largest asked
    # a cache handed back to the caller is theirs: the next call does not reset it under them
    out = model.generate(ids, max_new_tokens=5, return_dict_in_generate=True, **GREEDY)
    returned = out.get("past_key_values", out.get("cache"))
    assert returned is grown and model.generate.cache is None
    lengths = returned.layers[0].keys.lengths.clone()
    model.generate(ids, max_new_tokens=5, **GREEDY)
    assert model.generate.cache is not grown and torch.equal(returned.layers[0].keys.lengths, lengths)
    # the kept cache serves other batch sizes (beam search expands the batch) with the same numerics
    kept = model.generate.cache
    for kwargs in (dict(num_beams=3, num_return_sequences=2), dict(num_beams=1)):
        got = model.generate(prompt(20, batch=2), max_new_tokens=5, **kwargs, **GREEDY)
        assert torch.equal(got, oscar_reference(model, prompt(20, batch=2), 24, max_new_tokens=5, **kwargs))
        assert model.generate.cache is kept


def test_transformers_auto_compile_does_not_wrap_a_model_compiled_in_place():
    """On CUDA (here forced with ``_compile_all_devices``) transformers compiles the decode step of a compileable
    cache itself; over a model compiled in place that second torch.compile took the decode graphs away from
    the OScaR backend (transformers 5.17 GPU box: generate ran on OScaRCache, the report said 0 sites)."""
    model = use_oscar_cache(tiny(), CFG)
    compile_config = tf.CompileConfig(backend="eager")
    compile_config._compile_all_devices = True
    model.generation_config.compile_config = compile_config
    torch._dynamo.reset()
    backend = OScaRBackend(CFG, compiler="eager")
    compiled = torch.compile(model._call_impl, backend=backend)

    def no_grad_call(*args, **kwargs):  # how oscar.compile installs its compiled call (without Inductor here)
        with torch.no_grad():
            return compiled(*args, **kwargs)

    model._compiled_call_impl = no_grad_call
    ids = prompt()
    got = model.generate(ids, max_new_tokens=6, **GREEDY)
    assert torch.equal(got, oscar_reference(model, ids, 45, max_new_tokens=6))
    assert backend.report.graphs == 2 and backend.report.rewritten == 2  # prefill and decode, both ours
    assert len(backend.report.caches) == 2  # one entry per cache layer


# ---------------------------------------------------------------------------------------------------
# rows 5 and 14: the cache transformers would build (or not) decides


def _plain_and_hooked(**overrides):
    plain = tiny(**overrides)
    plain.set_attn_implementation("sdpa")
    hooked = use_oscar_cache(copy.deepcopy(plain), CFG)
    return plain, hooked


def _oscar_cache_updates(monkeypatch):
    """A list that grows at every ``OScaRCache.update`` (a forward writing into an OScaR cache)."""
    calls, update = [], OScaRCache.update
    monkeypatch.setattr(OScaRCache, "update", lambda self, *a, **k: calls.append(1) or update(self, *a, **k))
    return calls


def test_use_cache_false_argument_uses_no_cache(monkeypatch):
    plain, hooked = _plain_and_hooked()
    calls = _oscar_cache_updates(monkeypatch)
    ids = prompt()
    kwargs = dict(max_new_tokens=8, use_cache=False, output_logits=True, return_dict_in_generate=True, **GREEDY)
    assert_same_generation(hooked.generate(ids, **kwargs), plain.generate(ids, **kwargs))
    assert not calls and hooked.generate.cache is None


def test_model_config_use_cache_false_uses_no_cache(monkeypatch):
    plain, hooked = _plain_and_hooked(use_cache=False)
    calls = _oscar_cache_updates(monkeypatch)
    ids = prompt()
    kwargs = dict(max_new_tokens=8, output_logits=True, return_dict_in_generate=True, **GREEDY)
    want = plain.generate(ids, **kwargs)
    assert_same_generation(hooked.generate(ids, **kwargs), want)
    assert bool(calls) == (want.get("past_key_values", want.get("cache")) is not None)  # as transformers decides


def test_inputs_keyword_and_no_length_arguments():
    plain, hooked = _plain_and_hooked()
    ids = prompt()
    got = hooked.generate(inputs=ids, **GREEDY)  # no max_new_tokens / max_length: generation_config's
    want_len = plain.generate(inputs=ids, **GREEDY).shape[1]
    cache = hooked.generate.cache
    assert got.shape[1] == want_len and cache.max_cache_len == want_len - 1
    assert torch.equal(got, oscar_reference(plain, ids, want_len - 1, max_length=want_len))
    got = hooked.generate(input_ids=ids, max_length=50, **GREEDY)
    assert torch.equal(got, oscar_reference(plain, ids, 49, max_length=50))


def test_cache_implementation_given_by_the_caller_is_honoured():
    plain, hooked = _plain_and_hooked()
    ids = prompt()
    kwargs = dict(max_new_tokens=8, output_logits=True, return_dict_in_generate=True, **GREEDY)
    for impl in ("dynamic", "static"):
        got = hooked.generate(ids, cache_implementation=impl, **kwargs)
        assert_same_generation(got, plain.generate(ids, cache_implementation=impl, **kwargs))
        assert not isinstance(got.get("past_key_values", got.get("cache")), OScaRCache)


# ---------------------------------------------------------------------------------------------------
# rows 6, 11, 12: models that cannot take an OScaRCache are left exactly as they were

COMMON_SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2)
UNSUPPORTED = {
    "bloom": (tf.BloomConfig, tf.BloomForCausalLM, dict(COMMON_SMALL, n_head=2), "attention interface"),
    "mpt": (tf.MptConfig, tf.MptForCausalLM, dict(vocab_size=128, d_model=64, n_heads=2, n_layers=2), "attention interface"),
    "falcon_alibi": (
        tf.FalconConfig, tf.FalconForCausalLM,
        dict(COMMON_SMALL, num_attention_heads=2, alibi=True, new_decoder_architecture=False, multi_query=True),
        "attention interface",
    ),
    "t5": (
        tf.T5Config, tf.T5ForConditionalGeneration,
        dict(vocab_size=128, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2, decoder_start_token_id=0),
        "encoder-decoder",
    ),
    "bart": (
        tf.BartConfig, tf.BartForConditionalGeneration,
        dict(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
             decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128),
        "encoder-decoder",
    ),
}  # fmt: skip


@pytest.mark.parametrize("arch", list(UNSUPPORTED))
def test_models_without_oscar_support_are_left_untouched_and_reported(arch):
    config_cls, model_cls, kwargs, why = UNSUPPORTED[arch]
    torch.manual_seed(0)
    plain = model_cls(config_cls(**kwargs)).eval()
    model = copy.deepcopy(plain)
    reason = hf_unsupported_reason(model)
    assert reason is not None and why in reason and model_cls.__name__ in reason
    attn, attrs = model.config._attn_implementation, set(vars(model))
    with pytest.warns(UserWarning, match=why):
        assert use_oscar_cache(model, CFG) is model
    assert model.config._attn_implementation == attn and set(vars(model)) == attrs
    ids = prompt(12)
    kwargs = dict(max_new_tokens=6, output_logits=True, return_dict_in_generate=True, **GREEDY)
    assert_same_generation(model.generate(ids, **kwargs), plain.generate(ids, **kwargs))


@pytest.mark.parametrize("arch", ["bloom", "t5"])
def test_oscar_compile_reports_why_a_model_keeps_transformers_caches(arch):
    config_cls, model_cls, kwargs, why = UNSUPPORTED[arch]
    torch.manual_seed(0)
    plain = model_cls(config_cls(**kwargs)).eval()
    model = oscar.compile(copy.deepcopy(plain), CFG, disable=True)  # the hf route only, no tracing
    assert [(name, reason) for name, reason in model.oscar_report.skipped] == [
        (f"{model_cls.__name__} (OScaRCache)", hf_unsupported_reason(plain, CFG))
    ]
    assert model.config._attn_implementation == plain.config._attn_implementation and "generate" not in vars(model)
    ids = prompt(12)
    kwargs = dict(max_new_tokens=6, output_logits=True, return_dict_in_generate=True, **GREEDY)
    assert_same_generation(model.generate(ids, **kwargs), plain.generate(ids, **kwargs))


def test_supported_and_unsupported_by_general_rules():
    assert hf_unsupported_reason(tiny()) is None
    assert hf_unsupported_reason(tiny(tf.MistralConfig, tf.MistralForCausalLM, sliding_window=48)) is None
    assert "not a transformers PreTrainedModel" in hf_unsupported_reason(torch.nn.Linear(2, 2))
    assert "no generate()" in hf_unsupported_reason(tf.LlamaModel(tf.LlamaConfig(**SMALL)))
    reason = hf_unsupported_reason(tiny(head_dim=48))
    assert "head_dim 48" in reason and "group_size 32" in reason


# ---------------------------------------------------------------------------------------------------
# row 7: deepcopy and pickling


def test_deepcopy_generates_with_the_copy_and_the_model_pickles():
    model = use_oscar_cache(tiny(), CFG)
    ids = prompt()
    original = model.generate(ids, max_new_tokens=10, **GREEDY)
    dup = copy.deepcopy(model)
    assert isinstance(dup.generate, OScaRGenerate) and dup.generate.model is dup and dup.generate.cache is None
    with torch.no_grad():
        for p in dup.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = dup.generate(ids, max_new_tokens=10, **GREEDY)
    assert torch.equal(got, oscar_reference(dup, ids, 49, max_new_tokens=10)) and not torch.equal(got, original)
    assert torch.equal(model.generate(ids, max_new_tokens=10, **GREEDY), original)  # the original is unchanged
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert loaded.generate.model is loaded and torch.equal(loaded.generate(ids, max_new_tokens=10, **GREEDY), original)


def test_deepcopy_of_an_oscar_compiled_model_generates_with_the_copy():
    model = oscar.compile(tiny(), CFG)
    model._oscar_backend.compiler = "aot_eager"  # the copy is the subject, not Inductor's compile time
    dup = copy.deepcopy(model)
    assert dup._oscar_backend is not model._oscar_backend and dup._oscar_backend.compiler == "aot_eager"
    with torch.no_grad():
        for p in dup.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = prompt()
    assert dup.generate.model is dup
    got = dup.generate(ids, max_new_tokens=10, **GREEDY)
    assert torch.equal(got, oscar_reference(dup, ids, 49, max_new_tokens=10))
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the generate wrapper pickles


# ---------------------------------------------------------------------------------------------------
# row 9: byte counts against what transformers would hold (sliding-window layers)


def test_sliding_window_bytes_match_transformers_static_cache():
    model = tiny(tf.MistralConfig, tf.MistralForCausalLM, head_dim=32, sliding_window=48).to(torch.bfloat16)
    ids = prompt(60)
    plain = copy.deepcopy(model)
    plain.set_attn_implementation("sdpa")
    out = plain.generate(ids, max_new_tokens=20, cache_implementation="static", return_dict_in_generate=True, **GREEDY)
    static = out.get("past_key_values", out.get("cache"))
    static_bytes = sum(t.numel() * t.element_size() for layer in static.layers for t in (layer.keys, layer.values))
    assert [layer.keys.shape[2] for layer in static.layers] == [48, 48]  # transformers holds the window only

    use_oscar_cache(model, CFG)
    torch._dynamo.reset()
    backend = OScaRBackend(CFG, compiler="eager")  # the report oscar.compile fills, without Inductor
    model.compile(backend=backend)
    model.generate(ids, max_new_tokens=20, **GREEDY)
    cache = model.generate.cache
    report = cache.memory_report()
    assert report["static_cache_bytes"] == cache.bf16_nbytes() == static_bytes
    assert report["oscar_bytes"] == cache.nbytes() and report["ratio"] == static_bytes / cache.nbytes()
    assert backend.report.rewritten == 2
    assert backend.report.kv_bytes_bf16 == static_bytes  # once per layer, though two halves per layer are traced
    assert backend.report.kv_bytes_oscar == cache.nbytes()


# ---------------------------------------------------------------------------------------------------
# row 13: assisted / prompt-lookup decoding is refused before generating


@pytest.mark.parametrize("explicit_cache", [False, True])
def test_prompt_lookup_refused_before_any_forward(explicit_cache):
    model = use_oscar_cache(tiny(), CFG)
    ids = prompt(30)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    kwargs = {cache_kwarg_name(model): OScaRCache(model.config, 64, CFG)} if explicit_cache else {}
    try:
        with pytest.raises(NotImplementedError, match="assisted_generation.*rolls rejected tokens back"):
            model.generate(ids, prompt_lookup_num_tokens=5, max_new_tokens=20, **kwargs, **GREEDY)
    finally:
        handle.remove()
    assert not calls
    # transformers' own cache, passed for the call, works as on the plain model
    plain = copy.deepcopy(model)
    for name in ("generate", "_prepare_cache_for_generation"):
        plain.__dict__.pop(name)
    plain.set_attn_implementation("sdpa")
    lookup = dict(prompt_lookup_num_tokens=5, max_new_tokens=20, **GREEDY)
    got = model.generate(ids, **{cache_kwarg_name(model): tf.DynamicCache()}, **lookup)
    assert torch.equal(got, plain.generate(ids, **lookup))


def test_assistant_model_refused_before_any_forward():
    ids = prompt(30)
    for hooked_main in (True, False):  # the OScaR model generates, or drafts as the assistant
        main, assistant = tiny(seed=0), tiny(seed=1)
        use_oscar_cache(main if hooked_main else assistant, CFG)
        calls = []
        for m in (main, assistant):
            m.register_forward_pre_hook(lambda *a: calls.append(1))
        with pytest.raises(NotImplementedError, match="rolls rejected tokens back"):
            main.generate(ids, assistant_model=assistant, max_new_tokens=10, **GREEDY)
        assert not calls


# ---------------------------------------------------------------------------------------------------
# row 15: attention dropout in train() (Gemma2's softcap path)


def test_gemma2_softcap_attention_applies_dropout_and_backpropagates():
    kwargs = dict(head_dim=32, attention_dropout=0.5, attn_logit_softcapping=20.0, sliding_window=48)
    ids = prompt(20)

    def train_logits(impl, seed):
        model = tiny(tf.Gemma2Config, tf.Gemma2ForCausalLM, **kwargs).train()
        if impl == "oscar":
            use_oscar_attention(model)
        else:
            model.set_attn_implementation(impl)
        torch.manual_seed(seed)
        out = model(ids, use_cache=False)
        out.logits.float().pow(2).mean().backward()
        return out.logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad

    eager, eager_grad = train_logits("eager", 7)
    got, grad = train_logits("oscar", 7)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)
    other, _ = train_logits("oscar", 8)
    assert (other - got).abs().max() > 1e-2  # dropout draws differ with the seed: it is applied


def test_attention_dropout_over_an_oscar_cache_raises():
    model = tiny(tf.Gemma2Config, tf.Gemma2ForCausalLM, head_dim=32, attention_dropout=0.5, sliding_window=48)
    use_oscar_attention(model.train())
    cache = OScaRCache(model.config, 64, CFG)
    with pytest.raises(NotImplementedError, match="attention dropout 0.5.*inference-only"):
        model(prompt(20), **{cache_kwarg_name(model): cache})


# ---------------------------------------------------------------------------------------------------
# row 17 (part): argument checks, early and named


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(max_cache_len=None), TypeError, "max_cache_len must be a positive int"),
        (dict(max_cache_len=100.5), TypeError, "max_cache_len must be a positive int.*100.5"),
        (dict(max_cache_len=True), TypeError, "max_cache_len"),
        (dict(max_cache_len=-5), ValueError, "max_cache_len must be a positive int.*-5"),
        (dict(max_cache_len=0), ValueError, "max_cache_len"),
        (dict(max_cache_len=64, oscar_config={"bits": 2}), TypeError, r"oscar_config must be an OScaRConfig.*dict.*OScaRConfig\(\*\*settings\)"),
        (dict(max_cache_len=64, quantize_sliding="yes"), TypeError, "quantize_sliding must be a bool"),
        (dict(max_cache_len=64, capacity=32), ValueError, "capacity 32 is smaller than max_cache_len 64"),
        (dict(max_cache_len=64, max_batch_size=2), TypeError, "max_batch_size"),
    ],
)  # fmt: skip
def test_oscar_cache_arguments_checked_early(kwargs, error, match):
    config = tf.LlamaConfig(**SMALL)
    with pytest.raises(error, match=match):
        OScaRCache(config, **kwargs)


def test_use_oscar_cache_arguments_checked_early():
    model = tiny()
    attrs = set(vars(model))
    with pytest.raises(TypeError, match="oscar_config must be an OScaRConfig"):
        use_oscar_cache(model, {"bits": 2})
    with pytest.raises(ValueError, match="max_cache_len"):
        use_oscar_cache(model, CFG, max_cache_len=-1)
    with pytest.raises(TypeError, match=r"unknown OScaRCache options \['window'\]"):
        use_oscar_cache(model, CFG, window=4)
    assert set(vars(model)) == attrs
    use_oscar_cache(model, CFG, max_cache_len=48)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="needs up to 59 cache positions.*max_cache_len=48"):
        model.generate(prompt(40), max_new_tokens=20, **GREEDY)
    assert not calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within max_cache_len: fine, and no warning from the wrapper
        assert model.generate(prompt(40), max_new_tokens=9, **GREEDY).shape == (1, 49)


def _mark_overflow(cache):
    """What the CUDA append kernel does when a compiled step would pass the capacity: it writes nothing and
    marks ``lengths`` past it (``kernels.append_kv``); the CPU reference raises at the append instead."""
    layer = cache.oscar_layers[0]
    layer.keys.lengths.fill_(layer.keys.capacity + 1)
    layer._host_stale = True  # as after compiled steps


def test_overflow_marked_by_a_compiled_cuda_step_raises_at_the_next_eager_step_and_after_generate():
    model = tiny()
    use_oscar_cache(model)
    ids = prompt()
    cache = OScaRCache(model.config, max_cache_len=64)
    with torch.no_grad():
        model(ids, **{cache_kwarg_name(model): cache})
        _mark_overflow(cache)
        with pytest.raises(ValueError, match="overflow"):
            model(ids[:, :1], **{cache_kwarg_name(model): cache})
    # generate: the wrapper checks every OScaR layer once the loop is over (no sync inside it); the mark is
    # made after the last forward, so only that final check can see it
    calls = []

    def mark_at_the_last_step(input_ids, scores):
        calls.append(1)
        if len(calls) == 2:
            _mark_overflow(model.generate._lent[-1])
        return scores

    processors = tf.LogitsProcessorList([mark_at_the_last_step])
    with pytest.raises(ValueError, match="overflow"):
        model.generate(ids, max_new_tokens=2, do_sample=False, logits_processor=processors)
    assert len(calls) == 2
