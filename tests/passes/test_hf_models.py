"""oscar.compile on tiny Hugging Face models: generate() runs on OScaR state through OScaRCache.

The reference is the eager model with transformers' DynamicCache whose history is replaced by
``fake_quantize`` before every step (attend-then-append, DESIGN §2), fed the same tokens.
"""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import oscar_compile as oscar  # noqa: E402
from oscar_compile import fake_quantize  # noqa: E402
from oscar_compile.hf_cache import cache_kwarg_name  # noqa: E402
from pass_helpers import ATOL, CONFIG, RTOL, GraphRecorder  # noqa: E402

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
PROMPT, NEW = 40, 4  # the prompt completes one block of 32: decode attends to quantized tokens


def tiny(arch, impl):
    config_cls, model_cls = ARCHS[arch]
    cfg = config_cls(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     attn_implementation=impl)  # fmt: skip
    torch.manual_seed(0)
    return model_cls(cfg).eval()


@torch.no_grad()
def reference_logits(model, sequences, config):
    cache = DynamicCache(config=model.config)
    kwarg = cache_kwarg_name(model)
    raw, logits = None, []
    for step in range(NEW):
        start = 0 if step == 0 else PROMPT + step - 1
        ids = sequences[:, start : PROMPT + step]
        if raw is not None:
            for layer, (k, v) in zip(cache.layers, raw):
                layer.keys, layer.values = fake_quantize(k, v, config)
        out = model(input_ids=ids, use_cache=True, **{kwarg: cache})
        t = ids.shape[1]
        new = [(layer.keys[:, :, -t:], layer.values[:, :, -t:]) for layer in cache.layers]
        raw = new if raw is None else [(torch.cat([k, nk], 2), torch.cat([v, nv], 2)) for (k, v), (nk, nv) in zip(raw, new)]
        logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("arch,impl", [("llama", "sdpa"), ("qwen2", "eager")])
def test_hf_generate_runs_on_oscar(arch, impl):
    model = tiny(arch, impl)
    ref = copy.deepcopy(model)
    counters.clear()
    oscar.compile(model, CONFIG, fullgraph=True)
    recorder = model._oscar_backend.compiler = GraphRecorder(then="inductor")  # sees the rewritten graphs
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    report = model.oscar_report

    assert not counters["graph_break"], dict(counters["graph_break"])
    assert report.rewritten == 2 and report.skipped == [], str(report)
    assert all(r.kind == "sdpa (OScaRCache)" and r.kv_heads == 2 for r in report.sites.values())
    assert 0 < report.kv_bytes_oscar < report.kv_bytes_bf16
    assert recorder.graphs and all("torch.ops.oscar.sdpa" in g.code for g in recorder.graphs)
    for i, (got, want) in enumerate(zip(out.logits, reference_logits(ref, out.sequences, CONFIG))):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"step {i}: {m}")
    # and the quantized cache matters: full-precision attention gives visibly different logits
    with torch.no_grad():
        full = ref(input_ids=out.sequences[:, :-1]).logits[:, -1]
    assert (full - out.logits[-1]).abs().max() > 100 * ATOL
