"""Host time per eager call of the oscar ops on CUDA, against the same call captured in a CUDA graph.

    python benchmarks/launch_overhead.py [--calls 200] [--json FILE]     # GPU; --smoke: tiny CPU run

One decode step of one layer (Llama-3.1-8B shape: 32 query / 8 kv heads, D=128, bf16, batch 1, ~1000
tokens stored, no block flush) for each of ``ops.append_kv``, ``ops.attention``, ``ops.attend_append``,
called four ways:

* ``wrapper``: the Python wrapper, eager; on CUDA it launches the Triton kernels directly (``ops._launch_directly``);
* ``launcher``: the ``kernels`` launcher called bare with ``wrap_triton`` disabled (the wrapper minus its
  eligibility check and version-counter bump);
* ``torch.ops``: the registered op through the dispatcher (what the wrappers did before, and what a
  caller of ``torch.ops.oscar.*`` gets eagerly);
* ``launcher+HOP``: the ``kernels`` launcher called bare with ``wrap_triton`` enabled, so each kernel goes
  through the ``triton_kernel_wrapper_mutation`` higher-order op (how benchmarks called the launchers);
* ``graph``: the wrapper call captured once in a CUDA graph, replayed (``do_bench`` median): device time.

Eager timing: ``torch.cuda.synchronize()``, then N calls timed on the host clock; "host us" stops when
the last call returns (launch cost, the GPU may still be busy), "wall us" after a final synchronize.
``lengths`` is restored between measurements (and inside the graph, whose reset copy is timed alone and
subtracted), so every call appends at the same position.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

if "--smoke" in sys.argv:  # the CPU run interprets the Triton kernels: set before any kernel import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from oscar_compile import ops  # noqa: E402
from decode_attention import random_cache  # noqa: E402  (same folder)
from oscar_compile.kernels import CacheFormat  # noqa: E402

SHAPE = dict(batch=1, hq=32, hkv=8, d=128, stored=1000, max_len=4096)


def make_case(device, smoke):
    sh = dict(SHAPE, hq=4, hkv=2, d=64, stored=40, max_len=128) if smoke else SHAPE
    fmt = CacheFormat(2, 32, 32 if smoke else 128, True)
    c = random_cache(sh["batch"], sh["hkv"], sh["stored"] + 1, sh["d"], fmt, 0, device, max_len=sh["max_len"])
    q = torch.randn(sh["batch"], sh["hq"], 1, sh["d"], device=device, dtype=torch.bfloat16)
    k = torch.randn(sh["batch"], sh["hkv"], 1, sh["d"], device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return sh, fmt, c, q, k, v


def calls(fmt, c, q, k, v):
    """{op: {path: callable}}; every callable runs one decode step of that op."""
    from torch._library.triton import set_wrap_triton_enabled

    from oscar_compile.kernels.append_kv import append_kv as append_launcher
    from oscar_compile.kernels.cache_attention import cache_attention as attention_launcher

    f = (fmt.bits, fmt.group_size, fmt.residual_length, fmt.rotate_values)
    scale = q.shape[-1] ** -0.5

    def hop(fn):
        def run():
            with set_wrap_triton_enabled(True):
                return fn()

        return run

    def direct(fn):
        def run():
            with set_wrap_triton_enabled(False):
                return fn()

        return run

    return {
        "append_kv": {
            "wrapper": lambda: ops.append_kv(c, fmt, k, v),
            "launcher": direct(lambda: append_launcher(c, fmt, k, v)),
            "torch.ops": lambda: torch.ops.oscar.append_kv(*c, k, v, None, *f),
            "launcher+HOP": hop(lambda: append_launcher(c, fmt, k, v)),
        },
        "attention": {
            "wrapper": lambda: ops.attention(q, c, fmt, k, v),
            "launcher": direct(lambda: attention_launcher(q, c, fmt, k, v)),
            "torch.ops": lambda: torch.ops.oscar.attention(q, *c, k, v, None, *f, scale, None, None),
            "launcher+HOP": hop(lambda: attention_launcher(q, c, fmt, k, v)),
        },
        "attend_append": {
            "wrapper": lambda: ops.attend_append(q, c, fmt, k, v),
            "torch.ops": lambda: torch.ops.oscar.attend_append(q, *c, k, v, None, *f, scale, None, None, False),
        },
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_eager(fn, n, device, reset):
    for _ in range(3):  # warm-up: Triton compilation, allocator
        fn()
        reset()
    sync(device)
    best = None
    for _ in range(3):  # best of 3 repeats of n calls
        reset()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        sync(device)
        t2 = time.perf_counter()
        host, wall = (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6
        if best is None or host < best[0]:
            best = (host, wall)
    reset()
    return best


def time_graph(fn, reset):
    import triton

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        reset()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graphs = []
    for body in ((lambda: (fn(), reset())), reset):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        graphs.append(g)
    us = [triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median") * 1e3 for g in graphs]
    reset()
    return us[0] - us[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=200, help="eager calls per timing")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="also cProfile the direct attend_append path")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter): checks the script runs")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("launch_overhead.py needs a CUDA GPU (--smoke for a CPU run of the script)")
    device = torch.device("cpu" if args.smoke else "cuda")
    n = 2 if args.smoke else args.calls
    sh, fmt, c, q, k, v = make_case(device, args.smoke)
    base = c.lengths.clone()
    reset = lambda: c.lengths.copy_(base)  # noqa: E731
    import triton

    header = (
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (smoke)'}, torch {torch.__version__}, "
        f"triton {triton.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"B={sh['batch']} Hq={sh['hq']} Hkv={sh['hkv']} D={sh['d']} bf16, {sh['stored']} tokens stored, {n} calls"
    )
    print(header, flush=True)
    rows = []
    for op, paths in calls(fmt, c, q, k, v).items():
        for path, fn in paths.items():
            try:
                host, wall = time_eager(fn, n, device, reset)
                rows.append(dict(op=op, path=path, host_us=host, wall_us=wall))
            except Exception as exc:  # report and go on
                rows.append(dict(op=op, path=path, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            print(json.dumps(rows[-1]), flush=True)
        if device.type == "cuda":
            try:
                rows.append(dict(op=op, path="graph", device_us=time_graph(paths["wrapper"], reset)))
            except Exception as exc:
                rows.append(dict(op=op, path="graph", error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            print(json.dumps(rows[-1]), flush=True)
    if args.profile:  # where the host time of the direct path goes (cProfile, top functions by own time)
        import cProfile
        import pstats

        fn = calls(fmt, c, q, k, v)["attend_append"]["wrapper"]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            fn()
            reset()
        prof.disable()
        sync(device)
        print(f"\ncProfile of {n} eager ops.attend_append calls (+ lengths reset), top 15 by own time:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(dict(header=header, rows=rows), fh, indent=1)
    print()
    print(header)
    print(f"| {'op':<14} | {'path':<13} | {'host us/call':>12} | {'wall us/call':>12} | {'graph us':>9} |")
    print(f"|{'-' * 16}|{'-' * 15}|{'-' * 14}|{'-' * 14}|{'-' * 11}|")
    for r in rows:
        if "error" in r:
            print(f"| {r['op']:<14} | {r['path']:<13} | error: {r['error'][:60]}")
            continue
        cells = [f"{r['host_us']:.1f}" if "host_us" in r else "", f"{r['wall_us']:.1f}" if "wall_us" in r else "",
                 f"{r['device_us']:.1f}" if "device_us" in r else ""]  # fmt: skip
        print(f"| {r['op']:<14} | {r['path']:<13} | {cells[0]:>12} | {cells[1]:>12} | {cells[2]:>9} |")


if __name__ == "__main__":
    main()
