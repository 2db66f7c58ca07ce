"""Each pattern of tests/passes/patterns.py through the oscar backend (rewritten graph run as is, no
Inductor), called by a module that owns the caches as buffers (the pass replaces a module's cache): rewritten
ones equal the kernels' reference (cache_attention_ref, then append_kv_ref) step by step; reported ones keep
their exact outputs and their full-precision caches."""

import pytest
import torch

from oscar_compile.kernels import CacheFormat, allocate_cache, append_kv_ref, cache_attention_ref
from oscar_compile.passes import OScaRBackend
from oscar_compile.kv_tensor import is_oscar_cache
from patterns import REPORTED, REWRITTEN
from pass_helpers import ATOL, CONFIG, RTOL, GraphRecorder

B, HQ, HKV, D, S = 1, 4, 2, 32, 64


def steps(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for t0, t in ((0, 40), (40, 1), (41, 1)):  # prefill (one block of 32 quantized at append), two decodes
        out.append([torch.randn(shape, generator=g) for shape in ((B, HQ, t, D), (B, HKV, t, D), (B, HKV, t, D))])
        out[-1].append(torch.arange(t0, t0 + t))
    return out


# every pattern runs PatternModule.forward: its compiled entries would pile up to the recompile limit
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class PatternModule(torch.nn.Module):
    """Holds the caches and the causal mask as buffers; ``forward`` runs one pattern function on them."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.register_buffer("k_cache", torch.zeros(B, HKV, S, D))
        self.register_buffer("v_cache", torch.zeros(B, HKV, S, D))
        self.register_buffer("causal", torch.tril(torch.ones(S, S, dtype=torch.bool)))

    def forward(self, q, k, v, pos):
        return self.fn(q, self.k_cache, self.v_cache, k, v, pos, self.causal)


@pytest.mark.parametrize("name", sorted(REWRITTEN))
def test_pattern_is_rewritten(name):
    module = PatternModule(REWRITTEN[name])
    recorder = GraphRecorder()
    backend = OScaRBackend(CONFIG, compiler=recorder)
    compiled = torch.compile(module, backend=backend, fullgraph=True, dynamic=False)
    fmt = CacheFormat(CONFIG.bits, CONFIG.group_size, CONFIG.residual_length, CONFIG.rotate_values)
    ref = allocate_cache(B, HKV, S, D, fmt, torch.float32)
    scale = 0.125 if name in ("hf_static_sdpa", "gemma2_eager") else None
    softcap = 2.0 if name == "gemma2_eager" else None
    for i, (q, k, v, pos) in enumerate(steps()):
        if name == "prefill_is_causal" and i:
            break  # is_causal over the step's own tokens: a prefill-only form
        with torch.no_grad():
            out = compiled(q, k, v, pos)
        want = cache_attention_ref(q, ref, fmt, k, v, scale=scale, softcap=softcap)
        append_kv_ref(ref, fmt, k, v)
        torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"step {i}: {m}")
    assert backend.report.rewritten == 1 and not backend.report.skipped, str(backend.report)
    assert recorder.graphs and all("cache_step" in g.code for g in recorder.graphs)
    assert is_oscar_cache(module.k_cache) and is_oscar_cache(module.v_cache)


@pytest.mark.parametrize("name", sorted(REPORTED))
def test_pattern_is_reported(name):
    fn, reason = REPORTED[name]
    module, plain = PatternModule(fn), PatternModule(fn)
    backend = OScaRBackend(CONFIG, compiler="eager")
    compiled = torch.compile(module, backend=backend, fullgraph=True, dynamic=False)
    for q, k, v, pos in steps()[:2]:
        with torch.no_grad():
            out = compiled(q, k, v, pos)
            assert torch.equal(out, plain(q, k, v, pos))
    assert backend.report.rewritten == 0 and backend.report.skipped, str(backend.report)
    assert all(reason in r for _, r in backend.report.skipped), str(backend.report)
    assert type(module.k_cache) is torch.Tensor and torch.equal(module.k_cache, plain.k_cache)
