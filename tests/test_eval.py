"""The accuracy harness on a tiny random Llama (no downloads): exactness, decode-path quantization, "auto"."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from testing_utils import bits, randn, seeds
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import Cache, DynamicLayer

from oscar_compile import OScaRConfig, fake_quantize
from oscar_compile.eval import KVMethod, bits_per_element, continuation_nll, make_cache, make_windows, prefill
from oscar_compile.eval.caches import fake_keys, fake_values
from oscar_compile.eval.harness import _forward
from oscar_compile.kernels.key_transform import choose_key_flags
from oscar_compile.kernels.quantization import dequantize_keys, dequantize_values, quantize_keys, quantize_values

CONTEXT, CONT, CHUNK = 64, 32, 16
SMALL = dict(group_size=32, residual_length=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (2, CONTEXT + CONT + 1), generator=torch.Generator().manual_seed(1))


def _plain_nll(model, ids):
    logits = model(ids[:, :-1]).logits[:, CONTEXT:]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, CONTEXT + 1:], reduction="none").sum(1)


def test_quantizing_nothing_reproduces_the_plain_model(model, ids):
    m64 = LlamaForCausalLM(model.config).eval()
    m64.load_state_dict(model.state_dict())
    m64 = m64.double()  # float64: chunked decode and one full forward agree to rounding of 1e-12
    res = continuation_nll(m64, ids, CONTEXT, [KVMethod("none", "none")], CHUNK)["none"]
    torch.testing.assert_close(res.nll, _plain_nll(m64, ids).double(), rtol=1e-10, atol=1e-10)
    assert res.tokens == CONT


class _RefLayer(DynamicLayer):
    """The rule written plainly: attend to fake_quantize(stored history) + own step; store in bf16."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def update(self, k, v, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(k, v)
            self.keys, self.values = k[:, :, :0], v[:, :, :0]
        qk, qv = fake_quantize(self.keys, self.values, self.config) if self.config else (self.keys, self.values)
        out = torch.cat([qk, k], 2), torch.cat([qv, v], 2)
        rnd = lambda x: x.to(torch.bfloat16).to(x.dtype)  # noqa: E731
        self.keys, self.values = torch.cat([self.keys, rnd(k)], 2), torch.cat([self.values, rnd(v)], 2)
        return out


def _reference_nll(model, ids, config):
    cache = Cache(layers=[_RefLayer(None) for _ in range(model.config.num_hidden_layers)])
    _forward(model, ids[:, :CONTEXT], cache)  # full-precision prefill ...
    for layer in cache.layers:
        layer.config = config  # ... then every later step reads the quantized history
    nll = torch.zeros(ids.shape[0], dtype=torch.float64)
    for s in range(CONTEXT, CONTEXT + CONT, CHUNK):
        logits = _forward(model, ids[:, s:s + CHUNK], cache).logits
        nll += torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, s + 1:s + CHUNK + 1],
                                                 reduction="none").sum(1).double()
    return nll


@pytest.mark.parametrize("config", [OScaRConfig.kivi(**SMALL), OScaRConfig.paper(**SMALL),
                                    OScaRConfig.paper(bits=4, **SMALL)], ids=["kivi2", "paper2", "paper4"])
def test_decode_path_reads_the_quantized_cache(model, ids, config):
    got = continuation_nll(model, ids, CONTEXT, [KVMethod("q", "oscar", config), KVMethod("bf16", "bf16")], CHUNK)
    torch.testing.assert_close(got["q"].nll, _reference_nll(model, ids, config), rtol=1e-5, atol=1e-4)
    assert (got["q"].nll - got["bf16"].nll).abs().min() > 1e-3  # quantization really reached the scores


def test_auto_choice_is_deterministic_and_stored(model, ids):
    cfg = OScaRConfig(rotate_keys="auto", token_scaling="auto", **SMALL)
    method = KVMethod("auto", "oscar", cfg)
    kv, _ = prefill(model, ids[:, :CONTEXT])
    flags, nlls = [], []
    for _ in range(2):
        cache = make_cache(method, model.config, kv)
        nll = torch.zeros(2, dtype=torch.float64)
        for s in range(CONTEXT, CONTEXT + CONT, CHUNK):
            _forward(model, ids[:, s:s + CHUNK], cache)
        flags.append([(r.clone(), c.clone()) for r, c in cache.key_flags()])
        nlls.append(continuation_nll(model, ids, CONTEXT, [method], CHUNK, kv)["auto"].nll)
    torch.testing.assert_close(nlls[0], nlls[1], rtol=0, atol=0)
    for layer_idx, ((r0, c0), (r1, c1)) in enumerate(zip(*flags)):
        assert torch.equal(r0, r1) and torch.equal(c0, c1) and r0.shape == (2, 2)
        keys, _, queries = kv[layer_idx]
        stored = keys.to(torch.bfloat16).to(keys.dtype)
        for b in range(2):  # each sequence: the choice on its prompt's keys and last queries
            want = choose_key_flags(stored[b:b + 1], 2, 32, queries=queries[b:b + 1])
            assert torch.equal(r0[b], want[0]) and torch.equal(c0[b], want[1])
    # and the cache really used the stored flags
    layer = cache.layers[0]
    k = layer.hist_k[:1, :, :CONTEXT]
    ref = dequantize_keys(quantize_keys(k, 2, 32, layer.key_rotated[0], layer.key_scaled[0]))
    assert torch.equal(layer.view_k[:1, :, :CONTEXT], ref)


@given(seed=seeds, b=bits, t=st.sampled_from([32, 96]), rot=st.lists(st.booleans(), min_size=3, max_size=3),
       scale=st.lists(st.booleans(), min_size=3, max_size=3), rv=st.booleans())
def test_fast_fake_quant_is_bit_identical_to_the_reference(seed, b, t, rot, scale, rv):
    k = randn((1, 3, t, 64), seed=seed, scale=3.0)
    r, c = torch.tensor(rot), torch.tensor(scale)
    assert torch.equal(fake_keys(k, b, 32, r, c), dequantize_keys(quantize_keys(k, b, 32, r, c)))
    assert torch.equal(fake_values(k, b, 32, rv), dequantize_values(quantize_values(k, b, 32, rv)))


def test_sink_tokens_stay_exact(model, ids):
    method = KVMethod("sink", "oscar", OScaRConfig.kivi(**SMALL), sink_tokens=1)
    kv, _ = prefill(model, ids[:, :CONTEXT])
    cache = make_cache(method, model.config, kv)
    _forward(model, ids[:, CONTEXT:CONTEXT + CHUNK], cache)
    layer = cache.layers[1]
    assert torch.equal(layer.view_k[:, :, :1], layer.hist_k[:, :, :1])
    assert not torch.equal(layer.view_k[:, :, 1:CONTEXT], layer.hist_k[:, :, 1:CONTEXT])


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) for ch in text]}


def test_windows_start_at_different_documents():
    docs = [f"{i}" * 5 for i in range(10)]
    ws = make_windows(_Tok(), docs, 12, 5)
    assert [chr(w[0]) for w in ws] == ["0", "2", "4", "6", "8"] and all(len(w) == 12 for w in ws)
    assert chr(ws[0][7]) == "1"  # short documents continue into the next one


def test_bits_per_element():
    kivi = KVMethod("k", "oscar", OScaRConfig.kivi())
    assert bits_per_element(kivi, 8, 128) == pytest.approx(2 + 1 + 32 / (2 * 8 * 128))
    assert bits_per_element(KVMethod("b", "bf16"), 8, 128) == 16


def test_kl_from_the_bf16_cache(model, ids):
    # KL(bf16 || method) of the next-token distributions: 0 for the bf16 method itself, > 0 once blocks are
    # quantized, larger at 2 bits than at 4; a method that runs without bf16 first gets none
    cfg = OScaRConfig.paper(**SMALL)
    methods = [KVMethod("bf16", "bf16"), KVMethod("again", "bf16"), KVMethod("o2", "oscar", cfg, 2),
               KVMethod("o4", "oscar", cfg.replace(bits=4), 4)]
    res = continuation_nll(model, ids, CONTEXT, methods, CHUNK)
    assert res["bf16"].kl is None and torch.equal(res["again"].kl, torch.zeros(2, dtype=torch.float64))
    assert (res["o2"].kl > res["o4"].kl).all() and (res["o4"].kl > 0).all()
    assert continuation_nll(model, ids, CONTEXT, methods[2:3], CHUNK)["o2"].kl is None


def test_sliding_window_model_reproduced_exactly():
    # Gemma-3-style layers (two sliding, one global): the harness keeps every layer's whole history and the
    # model's own mask applies the window, so quantizing nothing gives the plain model's NLL
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, sliding_window=16, use_sliding_window=True,
                      layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(cfg).eval().double()
    ids = torch.randint(0, 97, (2, CONTEXT + CONT + 1), generator=torch.Generator().manual_seed(2))
    res = continuation_nll(m, ids, CONTEXT, [KVMethod("none", "none")], CHUNK)["none"]
    torch.testing.assert_close(res.nll, _plain_nll(m, ids).double(), rtol=1e-10, atol=1e-10)
