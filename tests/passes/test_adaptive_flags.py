"""oscar.compile with the default "auto" key flags: decided on device at each sequence's first step.

The state's per-kv-head flags must equal ``choose_key_flags`` of the prompt's keys and the first reader's
queries, outputs must match ``fake_quantize`` decided the same way, decode graphs must not run the choice,
and a new sequence (a write at position 0) decides afresh.
"""

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import oscar_compile as oscar
from oscar_compile import OScaRConfig
from oscar_compile.passes import default_backend
from oscar_compile.kernels import choose_key_flags
from pass_helpers import ATOL, RTOL, decode_steps, oscar_reference
from pass_models import Decoder

AUTO = OScaRConfig(residual_length=32)  # the default: rotate_keys="auto"


# Decoder.forward's compiled entries count toward Dynamo's recompile limit in later test modules
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _prompt_qk(model, x):
    """Each layer's queries and keys ``[B, H, T, D]`` for the prompt ``x`` (the models apply no RoPE)."""
    seen = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        for name in ("wq", "wk"):
            def hook(mod, inp, out, i=i, name=name, layer=layer):
                heads = layer.heads if name == "wq" else layer.kv_heads
                b, t, _ = out.shape
                seen[(i, name)] = out.view(b, t, heads, layer.head_dim).transpose(1, 2).clone()
            hooks.append(getattr(layer, name).register_forward_hook(hook))
    with torch.no_grad():
        model(x, torch.arange(x.shape[1]))
    for h in hooks:
        h.remove()
    return [(seen[(i, "wq")], seen[(i, "wk")]) for i in range(len(model.layers))]


def test_auto_flags_decided_at_each_sequence_start():
    torch.manual_seed(0)
    model = Decoder(write="index_copy_", gqa="repeat_kv").eval()
    with torch.no_grad():  # layer 1, kv head 1: an outlier key channel, so the heads need not agree
        model.layers[1].wk.weight[32 + 5] *= 25
    reference = Decoder(write="index_copy_", gqa="repeat_kv").eval()
    reference.load_state_dict(model.state_dict())
    first, second = decode_steps(prompt=40, decode=3, seed=0), decode_steps(prompt=40, decode=2, seed=5)
    counters.clear()
    oscar.compile(model, AUTO, fullgraph=True, dynamic=False)
    outs, codes = [], []
    with torch.no_grad():
        for x, pos in first:
            out, code = run_and_get_code(model, x, pos)
            outs.append(out)
            codes.append("\n".join(code))
    assert not counters["graph_break"] and model.oscar_report.rewritten == 2, str(model.oscar_report)
    states = [layer.kv_cache.k_cache for layer in model.layers]  # the OScaR key halves in the caches' place
    qk = _prompt_qk(reference, first[0][0])
    for state, (q, k) in zip(states, qk):
        want = choose_key_flags(k, 2, 32, queries=q, rotate="auto", scale=True)
        assert torch.equal(state.key_rotated, want[0]) and torch.equal(state.key_scaled, want[1])
    queries = {f"layers.{i}.kv_cache.k_cache": q for i, (q, _) in enumerate(qk)}
    pairs = [name.split("/") for name in model.oscar_report.caches]
    ref = oscar_reference(reference, first, pairs, AUTO, queries=queries)
    for i, (o, r) in enumerate(zip(outs, ref)):
        torch.testing.assert_close(o, r, atol=ATOL, rtol=RTOL, msg=lambda m: f"step {i}: {m}")
    # only the multi-token graph runs the choice: the prompt's compiled code calls it, the decode graph's does not
    assert "oscar.choose_key_flags" in codes[0]
    assert all(code and "oscar.choose_key_flags" not in code for code in codes[1:])
    # a new sequence (write at position 0) decides afresh, from its own prompt
    with torch.no_grad():
        outs2 = [model(x, pos) for x, pos in second]
    qk2 = _prompt_qk(reference, second[0][0])
    for state, (q, k) in zip(states, qk2):
        want = choose_key_flags(k, 2, 32, queries=q, rotate="auto", scale=True)
        assert torch.equal(state.key_rotated, want[0]) and torch.equal(state.key_scaled, want[1])
    queries2 = {f"layers.{i}.kv_cache.k_cache": q for i, (q, _) in enumerate(qk2)}
    ref2 = oscar_reference(reference, second, pairs, AUTO, queries=queries2)
    for i, (o, r) in enumerate(zip(outs2, ref2)):
        torch.testing.assert_close(o, r, atol=ATOL, rtol=RTOL, msg=lambda m: f"second sequence, step {i}: {m}")


def test_auto_flags_with_dynamic_prompt_lengths():
    # torch.compile(backend="oscar"): three prompt lengths make Dynamo go dynamic on T (the choice is in the
    # dynamic graph; a prompt shorter than a group keeps the initial flags, as choose_key_flags returns them)
    torch.manual_seed(0)
    model = Decoder().eval()
    ref = Decoder().eval()
    ref.load_state_dict(model.state_dict())
    backend = default_backend(AUTO)
    compiled = torch.compile(model, backend="oscar", options={"oscar_config": AUTO}, fullgraph=True)
    for prompt in (33, 20, 41, 12):
        steps = decode_steps(prompt=prompt, decode=2, seed=prompt)
        with torch.no_grad():
            outs = [compiled(x, pos) for x, pos in steps]
        qk = _prompt_qk(ref, steps[0][0])
        for layer, (q, k) in zip(model.layers, qk):
            want = choose_key_flags(k, 2, 32, queries=q, rotate="auto", scale=True)
            state = layer.kv_cache.k_cache
            assert torch.equal(state.key_rotated, want[0]) and torch.equal(state.key_scaled, want[1])
        pairs = [name.split("/") for name in backend.report.caches]
        queries = {f"layers.{i}.kv_cache.k_cache": q for i, (q, _) in enumerate(qk)}
        for o, r in zip(outs, oscar_reference(ref, steps, pairs, AUTO, queries=queries)):
            torch.testing.assert_close(o, r, atol=ATOL, rtol=RTOL)
    assert backend.report.rewritten == 2 and "key flags: 'auto'" in str(backend.report)
