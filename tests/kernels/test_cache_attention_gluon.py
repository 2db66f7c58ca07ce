"""The Gluon decode kernel (kernels/cache_attention_gluon.py).

Gluon has no interpreter, so on the CPU the kernel is compiled for sm_90 with Triton's own ptxas (in a
subprocess: the suite runs with ``TRITON_INTERPRET=1``): the compile itself proves every operand
conversion trivial (``assert_trivial=True``), and the TTGIR shows that the tile loop touches no shared
memory. ``OSCAR_TEST_CUDA=1`` on a GPU runs it against
``cache_attention_ref`` with the Gluon route forced on (the default routes small caches to Triton).
"""

import os
import re
import subprocess
import sys
from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oscar_compile.kernels import CacheFormat
from oscar_compile.kernels import cache_attention_gluon as gluon_module
from oscar_compile.kernels.cache_attention import TUNING, cache_attention, cache_attention_ref
from test_cache_attention import ON_GPU, DEVICE, _randn, assert_attention_close, filled_cache, nan_out_memory

POINTERS = {"qrot": "*fp32", "key_codes": "*u8", "key_mn": "*fp16", "key_scale": "*fp16", "key_norms": "*fp32",
            "val_codes": "*u8", "val_mn": "*fp16", "val_scale": "*fp16", "lengths": "*i32", "skip": "*i32",
            "key_scaled": "*i1", "part_o": "*fp32", "part_lse": "*fp32"}  # fmt: skip
UNIT_STRIDES = {"sqd", "skcd", "skmd", "sknt", "svcd", "svmg"}  # contiguous cache tensors


def compile_for_sm90(bits: int, head_dim: int, warps: int):
    """The kernel as launched on a contiguous cache (unit strides specialized, pointers 16-byte aligned)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = gluon_module.quantized_split_kernel
    consts = dict(HKV=8, GROUP=4, D=head_dim, BITS=bits, SPLITS=16, SPARTS=20, HAS_SKIP=True, W=warps)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in UNIT_STRIDES:
            sig[name], consts[name] = "constexpr", 1
        elif name in POINTERS:
            sig[name], attrs[(i,)] = POINTERS[name], [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name.startswith("s"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = GluonASTSource(fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


def loop_body(ttgir: str) -> str:
    """Lines of the tile loop of a TTGIR module: from its ``scf.for`` to its ``scf.yield``."""
    lines = ttgir.splitlines()
    start = next(i for i, line in enumerate(lines) if "scf.for" in line)
    end = next(i for i in range(start, len(lines)) if "scf.yield" in lines[i])
    return "\n".join(lines[start:end + 1])


@pytest.mark.parametrize("bits,head_dim,warps", [(2, 128, 4), (2, 64, 1)])
def test_compiles_for_sm90_without_shared_memory_in_the_loop(bits, head_dim, warps):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([here, os.path.dirname(here), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, __file__, str(bits), str(head_dim), str(warps)], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    body = loop_body(run.stdout)
    assert body.count("tt.dot") == (8 // bits) * (1 + 8 // bits)  # scores per field + values per field pair
    assert not re.search(r"ttg\.(local_alloc|local_load|local_store)|gpu\.barrier", body)
    assert "tt.load" in body


def test_supports_only_the_formats_it_was_written_for():
    assert gluon_module.supports(128, 128, 2, 32, 128) and gluon_module.supports(64, 64, 2, 32, 256)
    assert not gluon_module.supports(128, 128, 4, 32, 128)  # slower than the Triton kernel at 4 bits
    assert not gluon_module.supports(96, 128, 2, 32, 128)  # padded head_dim
    assert not gluon_module.supports(256, 256, 2, 32, 128)
    assert not gluon_module.supports(128, 128, 3, 32, 128)
    assert not gluon_module.supports(128, 128, 2, 64, 128)  # group size
    assert not gluon_module.supports(128, 128, 2, 32, 64)  # residual block shorter than a tile


@st.composite
def gluon_cases(draw):
    heads = draw(st.sampled_from((2, 8)))
    return dict(
        dim=draw(st.sampled_from((64, 128))),
        heads=heads,
        group=draw(st.sampled_from((1, 4, 5))),
        lengths=draw(st.lists(st.integers(0, 5000), min_size=1, max_size=3)),
        tq=draw(st.sampled_from((1, 1, 3))),
        rot=draw(st.lists(st.booleans(), min_size=heads, max_size=heads)),
        scl=draw(st.lists(st.booleans(), min_size=heads, max_size=heads)),
        rotate_values=draw(st.booleans()),
        use_skip=draw(st.booleans()),
        dtype=draw(st.sampled_from((torch.bfloat16, torch.float16))),
        warps=draw(st.sampled_from((1, 2, 4))),
        seed=draw(st.integers(0, 2**20)),
    )


@pytest.mark.skipif(not ON_GPU, reason="Gluon kernels run on the GPU only (OSCAR_TEST_CUDA=1)")
@settings(max_examples=16, deadline=None)
@given(case=gluon_cases())
def test_gluon_route_matches_reference(case):
    fmt = CacheFormat(2, 32, 128, case["rotate_values"])
    h, d, dtype, tq = case["heads"], case["dim"], case["dtype"], case["tq"]
    cache = filled_cache(fmt, case["lengths"], h, d, dtype, torch.tensor(case["rot"], device=DEVICE),
                         torch.tensor(case["scl"], device=DEVICE), case["seed"])  # fmt: skip
    b = len(case["lengths"])
    q = _randn((b, h * case["group"], tq, d), case["seed"] + 10, dtype)
    nk, nv = _randn((b, h, tq, d), case["seed"] + 11, dtype), _randn((b, h, tq, d), case["seed"] + 12, dtype)
    skip = torch.tensor([min(tq - 1, i) for i in range(b)], dtype=torch.int32, device=DEVICE)
    skip = skip if case["use_skip"] else None
    forced = dict(TUNING, gluon=dict(TUNING["gluon"], warps=case["warps"], min_token_heads=0))
    nan_out_memory(q.shape, dtype)
    with patch.dict(TUNING, forced):
        out = cache_attention(q, cache, fmt, nk, nv, skip)
    assert_attention_close(out, cache_attention_ref(q, cache, fmt, nk, nv, skip))


if __name__ == "__main__":  # compile_for_sm90(bits, head_dim, warps) -> TTGIR on stdout (see the test above)
    print(compile_for_sm90(*map(int, sys.argv[1:4])).asm["ttgir"])


@pytest.mark.skipif(not ON_GPU, reason="Gluon kernels run on the GPU only (OSCAR_TEST_CUDA=1)")
def test_default_route_under_torch_compile_and_cuda_graphs():
    """A cache past the routing threshold takes the Gluon kernel by default, also when the attention op is
    traced by torch.compile (an opaque op inside triton_op's decomposition) and replayed in CUDA graphs."""
    from oscar_compile import ops

    fmt = CacheFormat(2, 32, 128, True)
    h, d = 8, 128
    rot = torch.tensor([True, False] * 4, device=DEVICE)
    cache = filled_cache(fmt, [17000, 5003], h, d, torch.bfloat16, rot, rot.flip(0), seed=3)
    assert 2 * h * cache.key_codes.shape[2] * 4 >= TUNING["gluon"]["min_token_heads"]  # slots: B x Hkv x capacity
    q = _randn((2, 4 * h, 1, d), 4, torch.bfloat16)
    nk, nv = _randn((2, h, 1, d), 5, torch.bfloat16), _randn((2, h, 1, d), 6, torch.bfloat16)

    def step(q, nk, nv):
        return ops.attention(q, cache, fmt, nk, nv)

    eager = step(q, nk, nv)
    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        out = compiled(q, nk, nv).clone()
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    assert_attention_close(eager, cache_attention_ref(q, cache, fmt, nk, nv))
