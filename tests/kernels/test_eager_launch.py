"""The ops wrappers' eager fast path (oscar_compile.ops._launch_directly): direct kernel launches when
nothing traces, the registered op otherwise.

On CUDA the wrappers launch the Triton kernels without the op dispatch. Here the fast path is pointed at
the CPU (``ops._DIRECT_DEVICE``), so the same code runs the interpreted kernels: its results must equal
the reference (the op's CPU kernel), the op must not be called, and every tracing context (Dynamo, fake
tensors, a dispatch mode, autograd) must still see the op.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from oscar_compile import ops
from oscar_compile.kernels import CacheFormat
from oscar_compile.kernels.append_kv import append_kv_ref
from oscar_compile.kernels.cache_attention import cache_attention_ref
from test_append_kv import assert_storage_equal, clone_cache, exact_norm_keys
from testing_utils import poisoned_cache

FMT = CacheFormat(2, 32, 32, True)
H, HQ, D = 2, 4, 32


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of torch.ops.oscar.{append_kv, attention, attend_append} made through the namespace."""
    counts = {}

    class Spy:  # the op packet, counted when called (torch looks up .default etc. through it)
        def __init__(self, name):
            self.name, self.packet = name, getattr(torch.ops.oscar, name)

        def __call__(self, *args, **kwargs):
            counts[self.name] = counts.get(self.name, 0) + 1
            return self.packet(*args, **kwargs)

        def __getattr__(self, attr):
            return getattr(self.packet, attr)

    for name in ("append_kv", "attention", "attend_append"):
        monkeypatch.setattr(torch.ops.oscar, name, Spy(name))
    return counts


@pytest.fixture
def direct_on_cpu(monkeypatch):
    monkeypatch.setattr(ops, "_DIRECT_DEVICE", "cpu")


def _case(seed=0):
    cache = poisoned_cache("cpu", 2, H, 96, D, FMT, torch.bfloat16, torch.tensor([True, False]), True)
    k0 = exact_norm_keys(2, H, 40, D, seed).to(torch.bfloat16)
    append_kv_ref(cache, FMT, k0, -k0, torch.tensor([0, 7], dtype=torch.int32))
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(2, HQ, 3, D, generator=gen).to(torch.bfloat16)
    k = exact_norm_keys(2, H, 3, D, seed + 2).to(torch.bfloat16)
    v = torch.randn(2, H, 3, D, generator=gen).to(torch.bfloat16)
    return cache, q, k, v


def test_direct_path_matches_reference_without_the_op(direct_on_cpu, op_calls):
    cache, q, k, v = _case()
    ref = clone_cache(cache)
    version = cache.lengths._version
    out = ops.attention(q, cache, FMT, k, v)
    torch.testing.assert_close(out.float(), cache_attention_ref(q, ref, FMT, k, v).float(), atol=2e-2, rtol=0)
    assert out.is_contiguous()
    ops.append_kv(cache, FMT, k, v)
    append_kv_ref(ref, FMT, k, v)
    assert_storage_equal(cache, ref)
    assert cache.lengths._version > version  # mutation recorded as the op's ADInplaceOrView kernel does
    out = ops.attend_append(q, cache, FMT, k, v, scale=0.3)
    expect = cache_attention_ref(q, ref, FMT, k, v, scale=0.3)
    append_kv_ref(ref, FMT, k, v)
    torch.testing.assert_close(out.float(), expect.float(), atol=2e-2, rtol=0)
    assert cache.lengths.tolist() == ref.lengths.tolist() == [46, 39]
    assert op_calls == {}  # nothing went through the dispatcher


def test_off_device_uses_the_op(op_calls):
    """Without the redirect (CPU is not the fast path's device) every wrapper calls the op."""
    cache, q, k, v = _case(1)
    ops.attention(q, cache, FMT, k, v)
    ops.append_kv(cache, FMT, k, v)
    ops.attend_append(q, cache, FMT, k, v)
    assert op_calls == {"attention": 1, "append_kv": 1, "attend_append": 1}


def test_tracing_contexts_use_the_op(direct_on_cpu, op_calls):
    cache, q, k, v = _case(2)

    # a dispatch mode sees the op
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        ops.attention(q, cache, FMT, k, v)
    assert any("oscar.attention" in name for name in seen)
    assert op_calls == {"attention": 1}

    # fake tensors (AOT tracing, shape propagation): the op's fake impl, no kernel
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fc = type(cache)(*(mode.from_tensor(t) for t in cache))
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        assert ops.attend_append(fq, fc, FMT, fk, fv).shape == q.shape
    assert op_calls["attend_append"] == 1

    # autograd on an input: the op (which has no backward) decides, not a silent direct launch
    qg = q.float().requires_grad_()
    assert not ops._launch_directly(qg, (qg,))
    assert ops._launch_directly(q, (q, *cache))

    # Dynamo traces the op into the graph
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(lambda q, k, v, *c: ops.attention(q, type(cache)(*c), FMT, k, v), backend=backend, fullgraph=True)
    step(q, k, v, *cache)
    assert any("oscar.attention" in str(node.target) for gm in graphs for node in gm.graph.nodes)
    torch._dynamo.reset()
