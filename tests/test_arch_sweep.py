"""Architecture sweep, fast subset (``benchmarks/arch_sweep.py``, eager path): representative transformers
causal-LM types built from tiny configs; none may crash or give a silent wrong answer.

Each type: greedy generate after a 150-token prompt, plain vs ``use_oscar_cache`` with ``OScaRConfig()``,
``OScaRConfig.paper(bits=4)`` and ``residual_length=256`` (nothing quantized: must equal plain to float error).
"""

import importlib.util
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import transformers as tf  # noqa: E402

from oscar_compile import OScaRConfig  # noqa: E402
from oscar_compile.hf_cache import OScaRCache, hf_unsupported_reason, use_oscar_cache  # noqa: E402
from oscar_compile.passes import OScaRReport  # noqa: E402

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "arch_sweep.py")
_spec = importlib.util.spec_from_file_location("arch_sweep", _PATH)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

# type -> class it must get: plain softmax attention is rewritten; the others are declined with a reason
EXPECTED = {
    "llama": "rewritten",  # GQA, rotary
    "mistral": "rewritten",  # sliding window
    "gemma2": "rewritten",  # softcap, alternating sliding/full layers
    "qwen3": "rewritten",  # QK-norm
    "bloom": "untouched",  # ALiBi inside its own attention
    "diffllama": "untouched",  # differential attention: splits the cached values (behavioural probe)
    "deepseek_v32": "untouched",  # indexed (sparse latent) attention only
    "gpt2": "rewritten",  # absolute positions, fused qkv
}


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_sweep_subset(model_type):
    res = sweep.worker(model_type, compile_path=False)
    assert res["cls"] == EXPECTED[model_type], res
    if res["cls"] == "rewritten":
        assert res["relfp"] <= sweep.EXACT  # nothing quantized: the OScaR path computes what transformers does
        assert res["rel4"] < res["rel2"]  # 4-bit codes: closer to plain than 2-bit ones
        if model_type != "gemma2":  # gemma2's random-weight keys quantize worse (rel4 ~0.07, relfp exact)
            assert res["rel4"] <= sweep.CLOSE
        state = res["state"]
        assert state["oscar"] and not state["kept"] and not state["other"]
    else:  # declined: left exactly as transformers runs it, and the reason is given
        assert res["reason"] and res["rel4"] == 0.0 and res["rel2"] == 0.0 and res["relfp"] == 0.0
        assert res["state"]["cache"] != "OScaRCache"
        assert any("left untouched" in w for w in res["warnings"])


def test_classify_flags_unreported_differences():
    close = {"rel2": 0.05, "rel4": 0.01, "relfp": 1e-7}
    assert sweep.classify({**close, "state": {"oscar": [0, 1], "kept": {}, "other": []}}) == "rewritten"
    assert sweep.classify({**close, "state": {"oscar": [0], "kept": {"1": "linear_attention"}, "other": []}}) == "partial"
    # a layer neither OScaR nor listed as kept, or a no-quantization run that differs: silent
    assert sweep.classify({**close, "state": {"oscar": [0], "kept": {}, "other": [1]}}) == "silent"
    assert sweep.classify({**close, "relfp": 0.2, "state": {"oscar": [0, 1], "kept": {}, "other": []}}) == "silent"
    # nothing rewritten, output differs, no reason: silent; identical with a reason: untouched
    assert sweep.classify({**close, "reason": None, "state": {"oscar": []}}) == "silent"
    assert sweep.classify({"rel2": 0.0, "rel4": 0.0, "relfp": 0.0, "reason": "x", "state": {"oscar": []}}) == "untouched"


def test_tiny_config_shrinks_nested_and_per_layer_fields():
    config = sweep.tiny_config("gemma2")
    assert config.num_hidden_layers == 2 and config.hidden_size == 128 and config.head_dim == 32
    assert len(config.layer_types) == 2 and config.vocab_size == 512


def _tiny_gemma2():
    config = tf.Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=16, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return tf.Gemma2ForCausalLM(config).eval()


def test_kept_layers_are_reported_layer_by_layer():
    model = _tiny_gemma2()
    model.oscar_report = OScaRReport()  # as oscar.compile attaches it
    use_oscar_cache(model, OScaRConfig(), quantize_sliding=False)
    ids = torch.arange(1, 41)[None]
    model.generate(ids, max_new_tokens=3, do_sample=False)
    kept = {name for name, _ in model.oscar_report.skipped}
    sliding = [i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"]
    assert sliding and kept == {f"OScaRCache.layers[{i}]" for i in sliding}


def test_probe_declines_attention_that_is_not_softmax_over_the_cache():
    config = tf.DiffLlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.DiffLlamaForCausalLM(config).eval()
    before = model.config._attn_implementation
    reason = hf_unsupported_reason(model)
    assert reason is not None and "OScaR cache" in reason
    assert model.config._attn_implementation == before  # the probe leaves the model as it was
    ids = torch.arange(1, 41)[None]
    plain = model.generate(ids, max_new_tokens=4, do_sample=False)
    with pytest.warns(UserWarning, match="left untouched"):
        use_oscar_cache(model, OScaRConfig())
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), plain)


def test_unknown_layer_type_is_a_clear_error_not_a_key_error():
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    config.layer_types = ["full_attention", "heavily_compressed_attention"]
    with pytest.raises(NotImplementedError, match="heavily_compressed_attention"):
        OScaRCache(config, 16)


def test_report_says_larger_when_oscar_holds_more_bytes():
    report = OScaRReport()
    report.graphs = 1
    report.add_cache("c", 100, 147)
    assert "(1.47x larger)" in str(report) and "smaller" not in str(report)
    report.add_cache("d", 1000, 10)
    assert "smaller)" in str(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        str(report)
