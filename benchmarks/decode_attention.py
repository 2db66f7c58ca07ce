"""Decode attention on the GPU: OScaR INT2/INT4 Triton kernels vs every bf16 SDPA backend, same run.

For each head shape, batch and context length: one decode query token per sequence attends to a cache
of ``ctx`` tokens. bf16 baselines: ``F.scaled_dot_product_attention`` under each of the cuDNN, flash and
memory-efficient backends (native GQA, ``enable_gqa=True``). OScaR: ``kernels.cache_attention`` over a
packed cache holding ``ctx - 1`` tokens (complete 128-token blocks quantized, the rest in the residual)
plus the step's own token.

Timing: every method runs inside a CUDA graph that calls it once on each of several input copies (so
the 60 MB L2 cannot serve a copy from the previous call, and host launch overhead is out of the
numbers); ``triton.testing.do_bench`` medians of the graph replay, divided by the number of copies.
Achieved bandwidth counts the bytes each method must read (cache, query, output) once, against a
device-to-device copy measured in the same run (bytes read + written).

Quantize-on-write: ``kernels.append_kv`` for one decode token with no block to flush, with a flush
(a 128-token block quantized), and amortized over 128 consecutive tokens; per layer and for the 32
layers of a Llama-3.1-8B-shaped model, against an estimated decode step (bf16 weights read once at
the copy bandwidth plus 32 OScaR attention calls).

Usage (GPU only)::

    python benchmarks/decode_attention.py                 # full table
    python benchmarks/decode_attention.py --sweep         # also sweep the stage-1 launch parameters
    python benchmarks/decode_attention.py --quick         # batch 1, 8K and 128K only
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from oscar_compile.kernels import CacheFormat, allocate_cache
from oscar_compile.kernels.append_kv import append_kv
from oscar_compile.kernels.cache_attention import cache_attention, cache_attention_ref

# the module (kernels/__init__ re-exports the function under the same name)
cache_attention_module = sys.modules["oscar_compile.kernels.cache_attention"]

L2_BYTES = 60 * 2**20
SHAPES = {"llama8b": (32, 8, 128), "smollm2": (9, 3, 64)}  # (q heads, kv heads, head_dim)
BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
LLAMA8B_WEIGHT_BYTES = 16.06e9  # bf16 parameters of Llama-3.1-8B, read once per decode step
LAYERS = 32
# stage-1 variants tried by --sweep (on top of the current kernels.cache_attention.TUNING; the H200
# sweeps are in benchmarks/README.md)
SWEEP = [
    dict(gluon=None),  # the Triton kernel alone (the default before the Gluon kernel)
    dict(gluon={"warps": 2, "programs_per_sm": 8, "min_tiles": 2, "min_token_heads": 1 << 17}),
    dict(gluon={"warps": 4, "programs_per_sm": 8, "min_tiles": 1, "min_token_heads": 1 << 17}),
    dict(gluon={"warps": 1, "programs_per_sm": 16, "min_tiles": 4, "min_token_heads": 1 << 17}),
]
# (batch, context) cases of the sweep; the best configuration is chosen by the last one
SWEEP_CASES = [(1, 8192), (1, 32768), (8, 8192), (32, 8192), (8, 32768), (1, 131072)]
CHECK = False  # --check: compare each OScaR case with cache_attention_ref once (after timing)
COMPARE = None  # --compare MODULE: another cache_attention implementation timed as column "cmp"


def bench_graph(calls, warmup=25, rep=200):
    """Median time (us) of one call: a CUDA graph runs every callable in ``calls`` once per replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in calls:  # warm-up outside capture (compilation, cuDNN plans)
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    ms = triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")
    return ms * 1e3 / len(calls)


def copy_bandwidth():
    n = 2 * 2**30
    x = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    del x, y
    return 2 * n / (ms * 1e-3)


def n_copies(bytes_per_copy):
    return max(1, min(8, math.ceil(3 * L2_BYTES / max(bytes_per_copy, 1))))


def random_cache(batch, hkv, ctx, d, fmt, gen_seed, device="cuda", max_len=None):
    """A cache holding ctx - 1 tokens with random (finite, realistic-range) contents; ``max_len`` slots (default:
    ``ctx`` rounded up to whole residual blocks)."""
    if max_len is None:
        max_len = -(-ctx // fmt.residual_length) * fmt.residual_length
    torch.manual_seed(gen_seed)
    c = allocate_cache(batch, hkv, max_len, d, fmt, torch.bfloat16, device)
    c.key_codes.random_(0, 256)
    c.value_codes.random_(0, 256)
    c.key_mn.normal_(0, 0.05)
    c.key_scale.uniform_(0.005, 0.03)
    c.value_mn.normal_(-0.5, 0.1)
    c.value_scale.uniform_(0.1, 0.4)
    c.key_norms.uniform_(5, 30)
    c.residual_keys.normal_()
    c.residual_values.normal_()
    c.lengths.fill_(ctx - 1)
    return c


def oscar_bytes(batch, hq, hkv, ctx, d, bits, r=128, g=32):
    stored = ctx - 1
    q_tok, n_res = stored // r * r, stored % r
    per_head = 2 * q_tok * d * bits // 8 + q_tok // g * d * 4 + q_tok * (d // g) * 4  # codes + fp16 params
    residual = 2 * (n_res + 1) * d * 2  # residual + the new token, bf16
    return batch * (hkv * (per_head + residual) + q_tok * 4 + 2 * hq * d * 2)  # + norms, query, output


def bf16_bytes(batch, hq, hkv, ctx, d):
    return batch * (2 * hkv * ctx * d * 2 + 2 * hq * d * 2)


def bench_case(name, batch, ctx, bits_list, copy_bw, sdpa=True):
    hq, hkv, d = SHAPES[name]
    row = dict(shape=f"{name} {hq}/{hkv} D={d}", batch=batch, ctx=ctx)
    free = torch.cuda.mem_get_info()[0]
    need = bf16_bytes(batch, hq, hkv, ctx, d)
    if sdpa:
        if need * 1.3 > free:
            row["skipped"] = "bf16 cache does not fit"
            return row
        k_copies = n_copies(need)
        qs = [torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16) for _ in range(k_copies)]
        ks = [torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.bfloat16) for _ in range(k_copies)]
        vs = [torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.bfloat16) for _ in range(k_copies)]
        for bname, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend):
                    calls = [
                        (lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                        for q, k, v in zip(qs, ks, vs)
                    ]
                    us = bench_graph(calls)
                row[bname] = us
            except Exception as exc:  # backend not available for this shape/GPU
                row[bname] = None
                row[bname + "_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        row["bf16_bytes"] = need
        del qs, ks, vs
        torch.cuda.empty_cache()
        times = [row[b] for b in BACKENDS if row.get(b)]
        row["best_bf16"] = min(times) if times else None
        row["best_bf16_backend"] = min((row[b], b) for b in BACKENDS if row.get(b))[1] if times else None
    for bits in bits_list:
        fmt = CacheFormat(bits=bits, group_size=32, residual_length=128, rotate_values=True)
        nbytes = oscar_bytes(batch, hq, hkv, ctx, d, bits)
        copies = n_copies(nbytes)
        caches = [random_cache(batch, hkv, ctx, d, fmt, i) for i in range(copies)]
        qs = [torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        nks = [torch.randn(batch, hkv, 1, d, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        calls = [
            (lambda q=q, c=c, nk=nk: cache_attention(q, c, fmt, nk, nk))
            for q, c, nk in zip(qs, caches, nks)
        ]
        us = bench_graph(calls)
        if CHECK:  # the timed kernel against the reference on this case's first copy (bf16 output; the
            # kernel tests' bf16 tolerance, tests/kernels/test_cache_attention.py)
            ref = cache_attention_ref(qs[0], caches[0], fmt, nks[0], nks[0]).float()
            out = cache_attention(qs[0], caches[0], fmt, nks[0], nks[0]).float()
            row[f"oscar{bits}_max_err"] = (out - ref).abs().max().item()
            torch.testing.assert_close(out, ref, atol=1.6e-2, rtol=1.6e-2, msg=lambda m: f"INT{bits} B={batch} ctx={ctx}: {m}")
        if COMPARE is not None:
            cmp_calls = [
                (lambda q=q, c=c, nk=nk: COMPARE.cache_attention(q, c, fmt, nk, nk))
                for q, c, nk in zip(qs, caches, nks)
            ]
            row[f"cmp{bits}"] = bench_graph(cmp_calls)
        row[f"oscar{bits}"] = us
        row[f"oscar{bits}_bytes"] = nbytes
        row[f"oscar{bits}_tbps"] = nbytes / (us * 1e-6) / 1e12
        row[f"oscar{bits}_pct_copy"] = 100 * nbytes / (us * 1e-6) / copy_bw
        if row.get("best_bf16"):
            row[f"oscar{bits}_speedup"] = row["best_bf16"] / us
        del caches, qs, nks
        torch.cuda.empty_cache()
    return row


def bench_append(batch, copy_bw, attn_us_by_ctx):
    """Quantize-on-write of one decode token (Llama-3.1-8B shape: 8 kv heads, D=128)."""
    hkv, d = 8, 128
    fmt = CacheFormat(bits=2, group_size=32, residual_length=128, rotate_values=True)
    cache = random_cache(batch, hkv, 4096, d, fmt, 0)
    nk = torch.randn(batch, hkv, 1, d, device="cuda", dtype=torch.bfloat16)
    base = torch.full((batch,), 1000, dtype=torch.int32, device="cuda")  # 1000 % 128 = 104: no flush
    flush = torch.full((batch,), 1023, dtype=torch.int32, device="cuda")  # 1023 % 128 = 127: flush
    reset = lambda src: cache.lengths.copy_(src)  # noqa: E731
    t_reset = bench_graph([lambda: reset(base)])
    t_plain = bench_graph([lambda: (append_kv(cache, fmt, nk, nk), reset(base))]) - t_reset
    t_flush = bench_graph([lambda: (append_kv(cache, fmt, nk, nk), reset(flush))]) - t_reset
    cache.lengths.copy_(torch.full_like(base, 1024))
    start = torch.full((batch,), 1024, dtype=torch.int32, device="cuda")
    seq = [(lambda: append_kv(cache, fmt, nk, nk))] * 128 + [lambda: reset(start)]
    t_amort = (bench_graph(seq) * len(seq) - t_reset) / 128
    out = dict(batch=batch, per_token_us=t_plain, flush_us=t_flush, amortized_us=t_amort)
    weights_us = LLAMA8B_WEIGHT_BYTES / copy_bw * 1e6
    for ctx, attn_us in attn_us_by_ctx.items():
        step = weights_us + LAYERS * attn_us
        out[f"pct_step_{ctx}"] = 100 * LAYERS * t_amort / step
        out[f"step_est_us_{ctx}"] = step
    return out


def sweep(copy_bw, cases=SWEEP_CASES):
    """Stage-1 launch parameters, 32/8 heads, D=128, 2 bits, over ``cases`` (batch, context); prints the best by the
    last case and restores the defaults (``kernels.cache_attention.TUNING``) for the tables."""
    results = []
    configs = [dict(cache_attention_module.TUNING)]  # the current defaults first
    configs += [dict(configs[0], **cfg) for cfg in SWEEP]
    for cfg in configs:
        cache_attention_module.TUNING.update(cfg)
        try:
            times = [bench_case("llama8b", b, ctx, [2], copy_bw, sdpa=False)["oscar2"] for b, ctx in cases]
            results.append((times, dict(cache_attention_module.TUNING)))
            print(f"  sweep {' / '.join(f'{t:7.1f}' for t in times)} us  {cfg}", flush=True)
        except Exception as exc:
            print("sweep config failed", cfg, type(exc).__name__, str(exc)[:200], flush=True)
    best = min(results, key=lambda x: x[0][-1])
    cache_attention_module.TUNING.clear()
    cache_attention_module.TUNING.update(configs[0])  # the tables below run with the defaults
    print(f"sweep best by the last case {cases[-1]}:", best, flush=True)
    return results


def fmt_us(x):
    return "n/a" if x is None else f"{x:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 8192, 32768, 131072])
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--sweep", action="store_true", help="sweep stage-1 launch parameters first")
    ap.add_argument("--quick", action="store_true", help="batch 1, contexts 8K and 128K")
    ap.add_argument("--json", default=None, help="write all measurements here")
    ap.add_argument("--compare", default=None, help="module with another cache_attention, timed as 'cmp'")
    ap.add_argument("--no-append", action="store_true", help="skip the quantize-on-write measurements")
    ap.add_argument("--check", action="store_true", help="check every timed OScaR case against the reference")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_attention.py needs a CUDA GPU")
    global CHECK
    CHECK = args.check
    if args.quick:
        args.batches, args.contexts = [1], [8192, 131072]
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    header = (
        f"GPU {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print(header, flush=True)
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth (read + write): {copy_bw / 1e12:.2f} TB/s", flush=True)
    sweep_results = sweep(copy_bw) if args.sweep else None
    print("stage-1 tuning:", cache_attention_module.TUNING, flush=True)
    if args.compare:
        global COMPARE
        import importlib

        COMPARE = importlib.import_module(args.compare)

    rows = []
    for name in args.shapes:
        for batch in args.batches:
            for ctx in args.contexts:
                row = bench_case(name, batch, ctx, args.bits, copy_bw)
                rows.append(row)
                print(json.dumps(row), flush=True)

    attn_b1 = {r["ctx"]: r["oscar2"] for r in rows if r["shape"].startswith("llama8b") and r["batch"] == 1 and "oscar2" in r}
    appends = [] if args.no_append else [bench_append(b, copy_bw, attn_b1 if b == 1 else {}) for b in (1, 32)]
    for a in appends:
        print(json.dumps(a), flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, copy_bw=copy_bw, rows=rows, appends=appends, sweep=sweep_results), f, indent=1)

    from tabulate import tabulate

    table = []
    for r in rows:
        if "skipped" in r:
            table.append([r["shape"], r["batch"], r["ctx"], r["skipped"]])
            continue
        line = [r["shape"], r["batch"], r["ctx"]]
        line += [fmt_us(r.get(b)) for b in BACKENDS]
        line += [r.get("best_bf16_backend") or "n/a"]
        for bits in args.bits:
            line += [
                fmt_us(r.get(f"oscar{bits}")),
                f"{r[f'oscar{bits}_speedup']:.2f}x" if r.get(f"oscar{bits}_speedup") else "n/a",
                f"{r[f'oscar{bits}_tbps']:.2f} ({r[f'oscar{bits}_pct_copy']:.0f}%)",
            ]
            if args.compare:
                line += [fmt_us(r.get(f"cmp{bits}"))]
        table.append(line)
    cols = ["shape", "B", "ctx", "cuDNN us", "flash us", "eff. us", "best"]
    for bits in args.bits:
        cols += [f"INT{bits} us", f"INT{bits} vs best", f"INT{bits} TB/s (%copy)"]
        if args.compare:
            cols += [f"INT{bits} cmp us"]
    print()
    print(header)
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s; stage-1 tuning {cache_attention_module.TUNING}")
    print(tabulate(table, headers=cols, tablefmt="github"))
    print()
    app = [[a["batch"], f"{a['per_token_us']:.2f}", f"{a['flush_us']:.2f}", f"{a['amortized_us']:.2f}",
            f"{LAYERS * a['amortized_us']:.1f}",
            ", ".join(f"{k[9:]}: {v:.2f}%" for k, v in a.items() if k.startswith("pct_step_")) or "-"]
           for a in appends]  # fmt: skip
    print(tabulate(app, tablefmt="github", headers=[
        "B", "append 1 tok us (no flush)", "append w/ flush us", "amortized us/tok/layer",
        f"x{LAYERS} layers us", "% of est. decode step (B=1, by ctx)"]))  # fmt: skip
    for r in rows:
        for b in BACKENDS:
            if r.get(b + "_error"):
                print(f"note: {r['shape']} B={r['batch']} ctx={r['ctx']} {b}: {r[b + '_error']}")
                break


if __name__ == "__main__":
    main()
