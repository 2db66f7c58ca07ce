"""Each pattern of passes/patterns.py through the oscar backend (rewritten graph run as is, no Inductor):
rewritten ones equal the kernels' reference (cache_attention_ref, then append_kv_ref) step by step;
reported ones keep their exact outputs."""

import pytest
import torch

from oscar_compile.kernels import CacheFormat, allocate_cache, append_kv_ref, cache_attention_ref
from oscar_compile.passes import OScaRBackend
from oscar_compile.passes.patterns import REPORTED, REWRITTEN
from pass_helpers import ATOL, CONFIG, RTOL

B, HQ, HKV, D, S = 1, 4, 2, 32, 64


def steps(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for t0, t in ((0, 40), (40, 1), (41, 1)):  # prefill (one block of 32 quantized at append), two decodes
        out.append([torch.randn(shape, generator=g) for shape in ((B, HQ, t, D), (B, HKV, t, D), (B, HKV, t, D))])
        out[-1].append(torch.arange(t0, t0 + t))
    return out


def caches():
    return torch.zeros(B, HKV, S, D), torch.zeros(B, HKV, S, D), torch.tril(torch.ones(S, S, dtype=torch.bool))


@pytest.mark.parametrize("name", sorted(REWRITTEN))
def test_pattern_is_rewritten(name):
    fn = REWRITTEN[name]
    backend = OScaRBackend(CONFIG, inner="eager")
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
    k_cache, v_cache, causal = caches()
    fmt = CacheFormat(CONFIG.bits, CONFIG.group_size, CONFIG.residual_length, CONFIG.rotate_values)
    ref = allocate_cache(B, HKV, S, D, fmt, torch.float32)
    scale = 0.125 if name in ("hf_static_sdpa", "gemma2_eager") else None
    softcap = 2.0 if name == "gemma2_eager" else None
    for i, (q, k, v, pos) in enumerate(steps()):
        if name == "prefill_is_causal" and i:
            break  # is_causal over the step's own tokens: a prefill-only form
        with torch.no_grad():
            out = compiled(q, k_cache, v_cache, k, v, pos, causal)
        want = cache_attention_ref(q, ref, fmt, k, v, scale=scale, softcap=softcap)
        append_kv_ref(ref, fmt, k, v)
        torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"step {i}: {m}")
    assert backend.report.rewritten == 1 and not backend.report.skipped, str(backend.report)
    assert all("torch.ops.oscar.append_kv" in g.code for g in backend.graphs)


@pytest.mark.parametrize("name", sorted(REPORTED))
def test_pattern_is_reported(name):
    fn, reason = REPORTED[name]
    backend = OScaRBackend(CONFIG, inner="eager")
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
    k_cache, v_cache, causal = caches()
    k2, v2, _ = caches()
    for q, k, v, pos in steps()[:2]:
        with torch.no_grad():
            out = compiled(q, k_cache, v_cache, k, v, pos, causal)
            assert torch.equal(out, fn(q, k2, v2, k, v, pos, causal))
    assert backend.report.rewritten == 0 and backend.report.skipped, str(backend.report)
    assert all(reason in r for _, r in backend.report.skipped), str(backend.report)
    assert torch.equal(k_cache, k2) and k_cache.untyped_storage().nbytes() > 0
