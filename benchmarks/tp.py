"""Tensor-parallel decode: transformers TP (``tp_plan="auto"``) with a bf16 StaticCache vs ``oscar.compile`` (issue 15).

Run under torchrun, one process per GPU (NCCL); without torchrun (or ``--nproc-per-node 1``) it measures the
same models on one GPU, with no TP, for comparison:

    torchrun --standalone --nproc-per-node 2 benchmarks/tp.py --profile --json $OUT/tp2.json   # 2 GPUs
    python benchmarks/tp.py --json $OUT/tp1.json                                              # 1 GPU
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/tp.py --smoke --profile  # CPU, gloo, tiny

Models: Llama-3.1-8B-shaped and Llama-3-70B-shaped (hidden size, heads, kv heads, MLP width, vocabulary of the
real ones) with **random bf16 weights** and **the layer count reduced** (``--layers`` 8 of 32, ``--layers-70b`` 4 of 80:
device time and disk), built once and saved by rank 0, loaded by every rank with ``from_pretrained(...,
tp_plan="auto")``. Both caches are filled synthetically to the context (bf16: random keys/values written into the
StaticCache and its write counter set to the context; OScaR: random keys/values through the real quantize-on-write
op), then decode steps run. Nothing else is timed: no prefill, no ``generate()``.

What one number means (``ms``): the mean time of one decode step (batch ``--batch``, one new token per sequence)
at ``context`` stored tokens, over ``--steps`` steps after ``--warmup`` untimed ones (the first call compiles and,
with ``reduce-overhead``, the next ones warm up and record the CUDA graph), measured with CUDA events between two
points where both ranks are drained and lined up (``torch.cuda.synchronize`` + ``dist.barrier``), reported as the
slower rank's. Next to it, per step: ``host_ms``, the host time to submit the steps (if it is close to ``ms`` the
step is host-bound: the GPU waits for Python), and ``noguard_ms``, the same steps under
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: Dynamo's guards are not evaluated, as a serving engine
that calls a captured graph would not. Under TP the compiled frame carries hundreds of Python guards that a
single-process model does not (every DTensor parameter's spec, every TP ``forward`` closure), a host cost per step
that grows with the layer count; ``ms - noguard_ms`` is that cost.

Both paths are compiled the same way (``--mode``, ``fullgraph=True``, ``dynamic=False``, called under
``torch.no_grad``): bf16 ``torch.compile(model.forward)`` with a ``StaticCache`` (``--bf16-attention``: one bf16
method per attention variant, ``sdpa_packed`` = SDPA with the decode query packed per kv head, no K/V copy;
``sdpa`` = transformers' default, ``repeat_kv`` + SDPA), OScaR ``oscar.compile(model)``; ``--mode uncompiled``: no
torch.compile anywhere (bf16 the plain model, OScaR ``use_oscar_cache``). Each row also prints what the attention
reads per step: the StaticCache's capacity (SDPA reads it all, masked) and its write position; the OScaR layers'
stored token count (``lengths``, what its attention reads), checked against the context before and after timing.

``--profile``: one decode step per method at the largest context recorded with ``torch.profiler`` (CPU + CUDA
activities) on rank 0 (the other ranks run the same step unprofiled): the top-15 CUDA kernels by total time, NCCL
kernel time, device busy time vs host submit time, and graph/kernel launches per step.

Also per rank: the OScaR cache's bytes next to every rank's (``tensor_parallel.memory_report``), the largest
batch each cache fits at each context *at full depth* (computed from the exact per-rank bytes per sequence and
layer, the full model's per-rank weight bytes, the GPU's total memory and ``--reserve-gib``; not run), and the
cost of the alternative key norm (``tensor_parallel``, "Key norm across ranks"): one ``[B, 1]`` fp32
all-reduce per layer per step, captured in a CUDA graph, next to the model's own ``[B, 1, hidden]`` bf16 one.

Exit: results are written (``--json``, after every row) and printed before teardown. Teardown drops the compiled
graphs (CUDA graphs that captured NCCL kernels), then ``destroy_process_group`` runs in a thread given
``--exit-timeout`` seconds; the process then leaves with ``os._exit``: the first GPU run printed its table and then
hung in teardown until it was killed, and nothing is left to do after the output is flushed.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are
forced below; the device notes say why). The last thing printed (rank 0) is a short table.
"""

from __future__ import annotations

import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_name] = _value  # before torch/NCCL start: multicast can take the host's GPUs out of service

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from e2e import (  # noqa: E402  (benchmarks/e2e.py: one owner for fills and the model's step call)
    MODELS,
    cache_bytes_per_sequence,
    fill_oscar,
    fill_static,
    make_step,
    peak_gib,
    random_llama,
    reset_memory,
    set_bf16_attention,
)
from tabulate import tabulate  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

import oscar_compile as oscar  # noqa: E402
from oscar_compile import OScaRConfig, tensor_parallel  # noqa: E402
from oscar_compile.hf_cache import OScaRCache, use_oscar_cache  # noqa: E402

SHAPES = {
    "8b": dict(MODELS["8b"], full_layers=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, full_layers=80),
    "tiny": dict(MODELS["tiny"], full_layers=2),
}  # fmt: skip
GiB = 2**30
TOP_KERNELS = 15


def log(*args):
    if RANK == 0:
        print(*args, flush=True)


def llama_config(name: str, layers: int) -> LlamaConfig:
    shape = {k: v for k, v in SHAPES[name].items() if k != "full_layers"}
    shape["num_hidden_layers"] = min(layers, SHAPES[name]["full_layers"])
    cfg = LlamaConfig(**shape, max_position_embeddings=262144, head_dim=None)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    return cfg


def build(name: str, layers: int, device: str, workdir: Path):
    """The model on this rank: random weights (seed 0); under TP saved by rank 0 and loaded with tp_plan."""
    cfg = llama_config(name, layers)
    if WORLD == 1:
        return random_llama(cfg, device)
    path = workdir / f"{name}-L{cfg.num_hidden_layers}"
    if RANK == 0 and not (path / "config.json").exists():
        model = random_llama(cfg, device)
        model.save_pretrained(path)
        del model
        reset_memory(device)
    dist.barrier()
    return LlamaForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.bfloat16).eval()


def rank_view(model) -> SimpleNamespace:
    """What this rank's cache layers hold, as e2e's helpers read it from a model: local kv heads."""
    cfg = model.config
    heads = tensor_parallel.tp_info(model).kv_heads
    return SimpleNamespace(config=SimpleNamespace(num_hidden_layers=cfg.num_hidden_layers, num_key_value_heads=heads,
                                                  head_dim=cfg.head_dim))  # fmt: skip


def local_bytes(params) -> int:
    total = 0
    for p in params:
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total


def full_depth_weight_bytes(model, full_layers: int) -> int:
    """This rank's weight bytes if the model had all its layers: measured per layer, times the full count."""
    layers = model.model.layers
    per_layer = local_bytes(layers[0].parameters())
    rest = local_bytes(model.parameters()) - sum(local_bytes(layer.parameters()) for layer in layers)
    return rest + per_layer * full_layers


def allreduce_cost_us(model, batch: int, layers: int, device: str) -> dict:
    """Per decode step: ``layers`` all-reduces of [B, 1] fp32 (the all-reduced key norm) and of the model's own
    [B, 1, hidden] bf16, each sequence captured in a CUDA graph, replay timed (us, the slower rank's)."""
    if WORLD == 1 or device != "cuda":
        return {}
    out = {}
    for name, shape, dtype in (("norm_fp32", (batch, 1), torch.float32),
                               ("hidden_bf16", (batch, 1, model.config.hidden_size), torch.bfloat16)):  # fmt: skip
        x = torch.ones(shape, dtype=dtype, device=device)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                dist.all_reduce(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(layers):
                dist.all_reduce(x)
        for _ in range(3):
            g.replay()
        sync_ranks(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        out[name] = max(gather(start.elapsed_time(end) * 1e3 / 20))
        del g
    return out


# ---------------------------------------------------------------------------------------------------
# ranks, steps, timing


def sync_ranks(device: str):
    """Every rank's device drained and the ranks lined up: synchronize, barrier, synchronize."""
    if device == "cuda":
        torch.cuda.synchronize()
    if WORLD > 1:
        dist.barrier()
    if device == "cuda":
        torch.cuda.synchronize()


def gather(obj) -> list:
    """``obj`` from every rank (rank order); outside timed regions only."""
    if WORLD == 1:
        return [obj]
    out = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


class Decoder:
    """Decode steps at consecutive positions from ``position`` (the next free slot)."""

    def __init__(self, model, cache, forward, batch: int, position: int, device: str):
        self.call = make_step(model, cache, forward, device)
        self.tokens = torch.ones(batch, 1, dtype=torch.long, device=device)
        self.position = position

    def __call__(self):
        out = self.call(self.tokens, self.position)
        self.position += 1
        return out


def timed(decode: Decoder, steps: int, device: str, stance=None) -> dict:
    """``steps`` decode steps between two synchronized points of all ranks: CUDA-event ms per step (wall time on
    CPU), host submit ms per step, new graphs compiled meanwhile (must be 0); every rank's values."""
    graphs = unique_graphs()
    sync_ranks(device)
    with stance if stance is not None else _nullcontext():
        t0 = time.perf_counter()
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for _ in range(steps):
            decode()
        host = time.perf_counter() - t0
        if device == "cuda":
            end.record()
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ms = start.elapsed_time(end) / steps if device == "cuda" else wall * 1e3 / steps
    mine = dict(ms=ms, host_ms=host * 1e3 / steps, new_graphs=unique_graphs() - graphs)
    sync_ranks(device)
    ranks = gather(mine)
    return dict(ms=max(r["ms"] for r in ranks), host_ms=max(r["host_ms"] for r in ranks),
                new_graphs=max(r["new_graphs"] for r in ranks), ms_per_rank=[r["ms"] for r in ranks])  # fmt: skip


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def skip_guards_stance():
    """``set_stance(skip_guard_eval_unsafe=True)`` as a context manager, or None where torch lacks it."""
    try:
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    except (AttributeError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------------
# profile


HOST_CALLS = {  # CUDA runtime/driver calls counted per step (prefix match)
    "graph launches": ("cudaGraphLaunch",),
    "kernel launches": ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel"),
    "memcpy/memset": ("cudaMemcpy", "cudaMemset"),
    "host syncs": ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"),
}


def _union_us(intervals) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile_steps(decode: Decoder, steps: int, device: str) -> dict | None:
    """``steps`` decode steps recorded with torch.profiler on rank 0 (the others run them unprofiled, so every
    collective is matched); returns rank 0's summary (None elsewhere)."""
    sync_ranks(device)
    summary = None
    if RANK == 0:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                decode()
            host = time.perf_counter() - t0
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        summary = summarize_profile(prof, steps, host * 1e3 / steps, wall * 1e3 / steps, device)
    else:
        for _ in range(steps):
            decode()
    sync_ranks(device)
    return summary


def summarize_profile(prof, steps: int, host_ms: float, wall_ms: float, device: str) -> dict:
    """Per step: top CUDA kernels by total time, NCCL time, device busy time (union of kernel intervals) and span,
    host submit and wall time, runtime calls. On CPU (no CUDA activity): the top CPU ops by self time instead."""
    kernels, calls, intervals, host = defaultdict(float), Counter(), [], Counter()
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            us = evt.time_range.elapsed_us()
            kernels[evt.name] += us
            calls[evt.name] += 1
            intervals.append((evt.time_range.start, evt.time_range.end))
        elif evt.device_type == torch.autograd.DeviceType.CPU:
            kind = next((k for k, prefixes in HOST_CALLS.items() if evt.name.startswith(prefixes)), None)
            if kind is not None:
                host[kind] += 1
    out = dict(steps=steps, host_ms=host_ms, wall_ms=wall_ms, host_calls_per_step={k: host[k] / steps for k in HOST_CALLS})
    if kernels:
        busy = _union_us(intervals) / 1e3 / steps
        span = (max(b for _, b in intervals) - min(a for a, _ in intervals)) / 1e3 / steps
        nccl = sum(us for name, us in kernels.items() if "nccl" in name.lower()) / 1e3 / steps
        total = sum(kernels.values())
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
        out.update(device_busy_ms=busy, device_span_ms=span, kernel_sum_ms=total / 1e3 / steps, nccl_ms=nccl,
                   top=[(name[:110], us / steps, calls[name] / steps, 100 * us / total) for name, us in top])  # fmt: skip
        out["bound"] = "host" if host_ms > 0.9 * busy else "device"
    else:  # CPU run: the ops the host spent its time in
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:TOP_KERNELS]
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1.0
        out["top"] = [(e.key[:110], e.self_cpu_time_total / steps, e.count / steps, 100 * e.self_cpu_time_total / total) for e in rows]
    return out


def print_profile(row: dict, p: dict):
    head = f"\nprofile {row['model']} {row['method']} context {row['context']} batch {row['batch']}, {p['steps']} step(s), rank 0:"
    if "device_busy_ms" in p:
        head += (f" host submit {p['host_ms']:.3f} ms/step, wall to sync {p['wall_ms']:.3f}, device busy "
                 f"{p['device_busy_ms']:.3f} (span {p['device_span_ms']:.3f}, kernel sum {p['kernel_sum_ms']:.3f}, "
                 f"NCCL kernels {p['nccl_ms']:.3f}, includes waiting for the peer) -> {p['bound']}-bound; per step "
                 f"{', '.join(f'{k} {v:g}' for k, v in p['host_calls_per_step'].items())}")  # fmt: skip
        hdr = ["CUDA kernel", "us/step", "calls/step", "% of kernel time"]
    else:
        head += f" host {p['host_ms']:.3f} ms/step (CPU: no CUDA activity; top CPU ops by self time)"
        hdr = ["CPU op", "self us/step", "calls/step", "% of self time"]
    print(head)
    print(tabulate([[n, f"{us:.1f}", f"{c:g}", f"{pc:.1f}"] for n, us, c, pc in p["top"]], headers=hdr), flush=True)


# ---------------------------------------------------------------------------------------------------
# caches


def new_bf16_cache(model, view, batch, capacity, device):
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    cache.early_initialization(batch, view.config.num_key_value_heads, model.config.head_dim, torch.bfloat16, device)
    return cache


def fill_bf16(cache, view, batch, context, device):
    """Random keys/values in positions [0, context) and the layers' write counter at ``context``: transformers'
    StaticLayer.update writes at its own ``cumulative_length`` (5.17 ignores ``cache_position`` there), so without
    it the timed steps would overwrite positions 0, 1, ... of the filled cache."""
    fill_static(cache, view, batch, context, device)  # sets the write counters too


def cache_state(cache, method: str) -> dict:
    """What the attention reads per step (outside timed regions: host reads)."""
    if method == "oscar":
        lengths = torch.stack([layer.keys.lengths for layer in cache.oscar_layers]).cpu()
        cum = torch.stack([layer.cumulative_length for layer in cache.oscar_layers]).cpu()
        return dict(read=f"{int(lengths.min())}-{int(lengths.max())} stored tokens" if lengths.min() != lengths.max()
                    else f"{int(lengths.min())} stored tokens", lengths=(int(lengths.min()), int(lengths.max())),
                    position=(int(cum.min()), int(cum.max())))  # fmt: skip
    layer = cache.layers[0]
    cum = [int(l.cumulative_length) for l in cache.layers if hasattr(l, "cumulative_length")]
    cap = int(layer.keys.shape[2])
    return dict(read=f"{cap} slots (whole capacity, masked)", capacity=cap,
                position=(min(cum), max(cum)) if cum else None)  # fmt: skip


def check_state(state: dict, method: str, expect: int) -> str:
    """'ok' when the cache is at ``expect`` stored tokens (OScaR: every layer's lengths; bf16: write position)."""
    want = (expect, expect)
    got = state["lengths"] if method == "oscar" else state["position"]
    bad = [] if got in (want, None) else [f"{'lengths' if method == 'oscar' else 'write position'} {got}, expected {expect}"]
    if method == "oscar" and state["position"] != want:
        bad.append(f"positions {state['position']}, expected {expect}")
    return "ok" if not bad else "MISMATCH: " + "; ".join(bad)


# ---------------------------------------------------------------------------------------------------
# one model


def methods(args) -> list[tuple[str, str | None]]:
    """(method name, bf16 attention) in run order: the bf16 variants first, on the untouched model."""
    out = [("bf16" if len(args.bf16_attention) == 1 else f"bf16:{a}", a) for a in args.bf16_attention]
    return out + [("oscar", None)]


def run_model(name: str, args, device: str, config: OScaRConfig, workdir: Path, rows: list, dump) -> None:
    t0 = time.perf_counter()
    model = build(name, args.layers_70b if name == "70b" else args.layers, device, workdir)
    log(f"{name}: built/loaded in {time.perf_counter() - t0:.0f}s, {model.config.num_hidden_layers} layers, "
        f"{tensor_parallel.tp_info(model).kv_heads} kv heads per rank")
    view = rank_view(model)
    full = SHAPES[name]["full_layers"]
    layers = model.config.num_hidden_layers
    per_context = 1 + args.warmup + 2 * args.steps + (args.profile_steps if args.profile else 0)  # steps at a context
    margin = per_context + 1
    total_mem = torch.cuda.mem_get_info()[1] if device == "cuda" else 64 * GiB
    weights_full = full_depth_weight_bytes(model, full)
    compiled = args.mode != "uncompiled"
    skips0 = dict(torch._dynamo.utils.counters["inductor"]).get("cudagraph_skips", 0)
    breaks0 = sum(torch._dynamo.utils.counters["graph_break"].values())
    forward = None
    for method, attention in methods(args):
        torch._dynamo.reset()  # a fresh compile per method; also frees the previous method's CUDA graphs
        forward = None
        gc.collect()
        if method != "oscar":
            set_bf16_attention(model, attention)
            forward = torch.compile(model.forward, mode=args.mode, fullgraph=True, dynamic=False) if compiled else model.forward
        elif compiled:
            kw = {"mode": args.mode} if args.mode != "default" else {}
            oscar.compile(model, config, fullgraph=True, dynamic=False, **kw)
            forward = model
        else:
            use_oscar_cache(model, config)
            forward = model.forward
        cache = None
        for context in sorted(args.contexts):
            reset_memory(device)
            if method != "oscar":
                cache = new_bf16_cache(model, view, args.batch, context + margin, device)
                fill_bf16(cache, view, args.batch, context, device)
            else:
                if cache is None:  # one cache for every context, filled further (attention reads stored tokens only)
                    cache = OScaRCache(model.config, max(args.contexts) + margin * len(args.contexts), config)
                    cache.early_initialization(args.batch, view.config.num_key_value_heads, model.config.head_dim,
                                               torch.bfloat16, device)  # fmt: skip
                fill_oscar(cache, view, args.batch, context, device)
            before = cache_state(cache, method)
            check_before = check_state(before, method, context)
            decode = Decoder(model, cache, forward, args.batch, context, device)
            sync_ranks(device)
            t1 = time.perf_counter()
            decode()  # compiles (first context of a method, or a new cache shape)
            sync_ranks(device)
            first = time.perf_counter() - t1
            for _ in range(args.warmup):  # reduce-overhead: cudagraph trees warm up, record, then replay
                decode()
            main = timed(decode, args.steps, device)
            stance = skip_guards_stance() if compiled else None
            noguard = timed(decode, args.steps, device, stance) if stance is not None else None
            prof = profile_steps(decode, args.profile_steps, device) if args.profile and context == max(args.contexts) else None
            after = cache_state(cache, method)
            check_after = check_state(after, method, decode.position)
            row = dict(model=name, layers=layers, full_layers=full, world=WORLD, method=method, attention=attention,
                       mode=args.mode, batch=args.batch, context=context, ms=main["ms"], ms_per_rank=main["ms_per_rank"],
                       host_ms=main["host_ms"], noguard_ms=noguard and noguard["ms"],
                       noguard_host_ms=noguard and noguard["host_ms"],
                       new_graphs_timed=main["new_graphs"] + (noguard["new_graphs"] if noguard else 0),
                       first_s=first, peak_gib=peak_gib(device), reads=before["read"],
                       cache_check=check_before if check_before != "ok" else check_after,
                       cache_before=before, cache_after=after)  # fmt: skip
            per_seq_layer = cache_bytes_per_sequence(
                SimpleNamespace(config=SimpleNamespace(**{**vars(view.config), "num_hidden_layers": 1})),
                context + margin, "oscar" if method == "oscar" else "bf16", config)  # fmt: skip
            free_full = total_mem - weights_full - args.reserve_gib * GiB
            row["max_batch_full_depth"] = max(0, int(free_full // (per_seq_layer * full)))
            row["cache_gib_per_seq_full_depth"] = per_seq_layer * full / GiB
            if method == "oscar":
                mem = tensor_parallel.memory_report(cache, model)
                row["per_rank_oscar_bytes"] = mem["per_rank_oscar_bytes"]
                row["static_bytes_this_rank"] = mem["static_cache_bytes"]
                tensor_parallel.check_consistent(cache, model)
                for layer in cache.oscar_layers:  # the next fill continues after the steps just run
                    layer.host_length, layer._host_stale = decode.position, False
            if prof is not None:
                row["profile"] = prof
            rows.append(row)
            log("decode", json.dumps({k: v for k, v in row.items() if k != "profile"}))
            if row["cache_check"] != "ok":
                log(f"WARNING {name} {method} {context}: cache check {row['cache_check']}")
            if prof is not None and RANK == 0:
                print_profile(row, prof)
            dump()
        del cache, decode
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks0
    skips = dict(torch._dynamo.utils.counters["inductor"]).get("cudagraph_skips", 0) - skips0
    torch._dynamo.reset()
    del forward
    gc.collect()
    cost = allreduce_cost_us(model, args.batch, full, device)
    for row in rows:
        if row["model"] == name:
            row.update(graph_breaks=breaks, cudagraph_skips=skips, allreduce_us_full_depth=cost)
    log(f"{name}: graph breaks {breaks}, cudagraph skips {skips}, all-reduce cost per step at full depth {cost}")
    dump()
    del model
    reset_memory(device)


# ---------------------------------------------------------------------------------------------------
# report


def fmt_ms(x):
    return "-" if x is None else f"{x:.2f}"


def table(rows: list[dict]) -> str:
    out = []
    best_bf16 = {}
    for r in rows:
        if r["method"] != "oscar":
            key = (r["model"], r["context"])
            best_bf16[key] = min(best_bf16.get(key, float("inf")), r["ms"])
    for r in rows:
        ctx = f"{r['context'] // 1024}K" if r["context"] >= 1024 else str(r["context"])
        b = best_bf16.get((r["model"], r["context"]))
        out.append([
            f"{r['model']} ({r['layers']}/{r['full_layers']} layers)", r["world"], ctx, r["method"], fmt_ms(r["ms"]),
            fmt_ms(r["host_ms"]), fmt_ms(r["noguard_ms"]),
            f"{b / r['ms']:.2f}x" if r["method"] == "oscar" and b else "",
            r["reads"], r["cache_check"], r["new_graphs_timed"], r["max_batch_full_depth"],
        ])  # fmt: skip
    return tabulate(out, headers=["model", "GPUs", "context", "method", "ms/step", "host ms/step", "ms/step, no guards",
                                  "speedup vs best bf16", "attention reads", "cache check", "graphs compiled while timed",
                                  "max batch (full depth)"])  # fmt: skip


def allreduce_table(rows: list[dict]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        r = next(x for x in rows if x["model"] == model and x["method"] == "oscar")
        norm = (r.get("allreduce_us_full_depth") or {}).get("norm_fp32")
        step_full_us = r["ms"] * 1e3 / r["layers"] * r["full_layers"]  # rough: per-layer share of the step
        out.append([model, r.get("graph_breaks"), r.get("cudagraph_skips"), r.get("per_rank_oscar_bytes"),
                    "-" if norm is None else f"{norm:.0f} us ({100 * norm / step_full_us:.1f}%)"])  # fmt: skip
    return tabulate(out, headers=["model", "graph breaks", "cudagraph skips", "OScaR bytes per rank",
                                  "norm all-reduce/step (full depth)"])  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# main


def shutdown(device: str, timeout: float, code: int = 0):
    """Flush, drop compiled graphs, destroy the process group (in a thread, ``timeout`` s), then ``os._exit``.

    The first GPU run hung after printing its table in teardown (NCCL communicators referenced by CUDA graphs
    that cudagraph trees still held, and interpreter exit with Inductor's worker pool alive): the graphs are
    dropped first, and whatever still blocks is cut off by ``os._exit`` once everything has been written."""
    sys.stdout.flush()
    sys.stderr.flush()
    if WORLD > 1 and dist.is_initialized():
        if device == "cuda":
            torch.cuda.synchronize()
        torch._dynamo.reset()  # releases cudagraph trees (graphs holding NCCL kernels)
        gc.collect()

        def teardown():
            dist.barrier()
            dist.destroy_process_group()

        worker = threading.Thread(target=teardown, daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            print(f"rank {RANK}: destroy_process_group did not return within {timeout:g}s; exiting anyway", flush=True)
        else:
            log("process group destroyed")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main():
    global RANK, WORLD
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["8b", "70b"], choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=8, help="decoder layers built (8B-shaped: of 32)")
    p.add_argument("--layers-70b", type=int, default=4, help="decoder layers built for the 70B shape (of 80)")
    p.add_argument("--contexts", type=int, nargs="*", default=[32768, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=30, help="timed decode steps (twice: with and without guards)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after the first (compiling) call")
    p.add_argument("--mode", default="reduce-overhead",
                   help="torch.compile mode of both paths (reduce-overhead = CUDA graphs, default, ...) or 'uncompiled'")
    p.add_argument("--bf16-attention", nargs="+", choices=["sdpa", "sdpa_packed"], default=["sdpa_packed"],
                   help="bf16 methods: one per attention (sdpa_packed: decode query packed per kv head; sdpa: "
                        "transformers' default, repeat_kv + SDPA)")
    p.add_argument("--config", choices=["default", "paper"], default="default")
    p.add_argument("--profile", action="store_true", help="profile one decode step per method at the largest context")
    p.add_argument("--profile-steps", type=int, default=1)
    p.add_argument("--reserve-gib", type=float, default=8.0, help="memory per GPU kept for activations/graphs")
    p.add_argument("--workdir", default="/tmp/oscar_tp_models", help="where rank 0 saves the random models")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="cpu: gloo instead of NCCL")
    p.add_argument("--tiny", action="store_true", help="the tiny model, short contexts, few steps")
    p.add_argument("--smoke", action="store_true", help="= --device cpu --tiny --mode default (a CPU check of the script)")
    p.add_argument("--exit-timeout", type=float, default=60.0, help="seconds destroy_process_group may take at exit")
    p.add_argument("--json", help="write the rows here (rank 0), after every row")
    args = p.parse_args()
    if args.smoke:
        args.device, args.tiny = "cpu", True
        args.mode = "default" if args.mode == "reduce-overhead" else args.mode
    if args.tiny:
        args.models, args.layers, args.contexts = ["tiny"], 2, [256, 512]
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 2)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and args.mode == "reduce-overhead":
        args.mode = "default"  # no CUDA graphs on CPU
    RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if WORLD > 1:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
        else:
            dist.init_process_group("gloo")
    if device == "cpu":
        torch.set_num_threads(1)
    config = OScaRConfig() if args.config == "default" else OScaRConfig.paper()
    import transformers

    meta = dict(world=WORLD, device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                transformers=transformers.__version__, config=repr(config), args=vars(args),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))  # fmt: skip
    log(json.dumps(meta))
    rows: list[dict] = []
    t0 = time.perf_counter()

    def dump():
        if RANK == 0 and args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, rows=rows, seconds=time.perf_counter() - t0), f, indent=1, default=str)

    code = 0
    try:
        for name in args.models:
            run_model(name, args, device, config, Path(args.workdir), rows, dump)
        if RANK == 0:
            print(f"\ntotal {time.perf_counter() - t0:.0f}s, mode {args.mode}, batch {args.batch}; ms/step: CUDA events "
                  f"between synchronized points of all ranks, the slower rank's, {args.steps} steps after "
                  f"{args.warmup} + 1; host ms/step: time to submit them; no guards: skip_guard_eval_unsafe; max batch: "
                  f"computed at full depth from exact per-rank bytes, {args.reserve_gib:g} GiB reserved; norm "
                  f"all-reduce: {args.batch}x1 fp32 per layer, % of the step scaled to full depth")  # fmt: skip
            print(table(rows))
            print()
            print(allreduce_table(rows), flush=True)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        dump()
    shutdown(device, args.exit_timeout, code)


RANK, WORLD = 0, 1

if __name__ == "__main__":
    main()
