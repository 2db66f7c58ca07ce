"""End-to-end decode latency, throughput and memory: transformers StaticCache (bf16) vs oscar.compile.

Llama-architecture models with random bf16 weights (speed does not depend on the weights). The KV cache
is filled synthetically to save device time: the bf16 StaticCache gets random keys/values; the OScaR
cache gets random keys/values appended through the real quantize-on-write op (so its state is a real
quantized cache). Then decode steps run through the compiled model (CUDA graphs, fullgraph) and are timed
with CUDA events. Bandwidth floors come from the bytes one decode step must read (weights + KV) at the
copy bandwidth measured in the same run.

Usage (GPU):
    python benchmarks/e2e.py --model 8b --contexts 8192 32768 131072 --batches 1
    python benchmarks/e2e.py --model 8b --contexts 32768 --batches 8
    python benchmarks/e2e.py --model 8b --throughput 4096
CPU smoke test (tiny model, no CUDA graphs):
    python benchmarks/e2e.py --model tiny --contexts 256 --batches 2 --steps 3
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from tabulate import tabulate
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import oscar_compile as oscar
from oscar_compile import OScaRConfig
from oscar_compile.hf_cache import OScaRCache, cache_kwarg_name
from oscar_compile.kernels import CacheFormat, allocate_cache, cache_nbytes
from oscar_compile.kv_tensor import cache_tensors
from oscar_compile import ops

MODELS = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}  # fmt: skip


def build_model(name: str, device: str) -> LlamaForCausalLM:
    cfg = LlamaConfig(**MODELS[name], max_position_embeddings=262144, head_dim=None)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(default)
    return model.eval()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    if device != "cuda":
        return float("nan")
    import triton.testing

    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100)
    return 2 * n / (ms * 1e-3)


def layer_shapes(model):
    cfg = model.config
    return cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim


def kv_read_bytes(model, batch: int, context: int, method: str, config: OScaRConfig) -> int:
    """Bytes of KV state one decode step reads at ``context`` tokens."""
    layers, heads, d = layer_shapes(model)
    if method == "bf16":
        return 2 * layers * batch * heads * context * d * 2
    r = config.residual_length
    fmt = CacheFormat(config.bits, config.group_size, r, config.rotate_values)
    quantized = context // r * r
    per_layer = cache_nbytes(allocate_cache(batch, heads, max(quantized, r), d, fmt, torch.bfloat16, "meta"))
    per_layer -= 2 * batch * heads * r * d * 2  # residual buffers: count what is read below
    per_layer = per_layer * quantized // max(quantized, r) + 2 * batch * heads * (context - quantized) * d * 2
    return layers * per_layer


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fill_static(cache: StaticCache, model, batch: int, context: int, device: str):
    layers, heads, d = layer_shapes(model)
    gen = torch.Generator(device=device).manual_seed(1)
    for layer in cache.layers:
        k = torch.empty(batch, heads, 1, d, dtype=torch.bfloat16, device=device)
        if not layer.is_initialized:
            layer.lazy_initialization(k, k)
        layer.keys[:, :, :context].normal_(generator=gen)
        layer.values[:, :, :context].normal_(generator=gen)


def fill_oscar(cache: OScaRCache, model, batch: int, context: int, device: str, chunk: int = 4096):
    """Append ``context`` random tokens per layer through the real quantize-on-write op."""
    layers, heads, d = layer_shapes(model)
    gen = torch.Generator(device=device).manual_seed(1)
    for layer in cache.oscar_layers:
        k = torch.empty(batch, heads, 1, d, dtype=torch.bfloat16, device=device)
        if not layer.is_initialized:
            layer.lazy_initialization(k, k)
        ct = cache_tensors(layer.keys, layer.values)
        fmt = layer.keys.fmt
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            nk = torch.randn(batch, heads, n, d, dtype=torch.bfloat16, device=device, generator=gen)
            nv = torch.randn(batch, heads, n, d, dtype=torch.bfloat16, device=device, generator=gen)
            ops.append_kv(ct, fmt, nk, nv)
        layer.values.lengths.copy_(layer.keys.lengths)
        layer.cumulative_length.fill_(context)
        layer.host_length = context


def decode_timing(step, tokens, positions_start: int, steps: int, warmup: int, device: str):
    """Run ``warmup`` + ``steps`` decode steps; returns (first-call seconds, median-free mean ms/step)."""
    t0 = time.perf_counter()
    step(tokens, positions_start)
    sync(device)
    first = time.perf_counter() - t0
    for i in range(1, warmup):
        step(tokens, positions_start + i)
    sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            step(tokens, positions_start + warmup + i)
        end.record()
        torch.cuda.synchronize()
        return first, start.elapsed_time(end) / steps
    t0 = time.perf_counter()
    for i in range(steps):
        step(tokens, positions_start + warmup + i)
    return first, (time.perf_counter() - t0) * 1e3 / steps


def make_step(model, cache, compiled, device):
    kwarg = cache_kwarg_name(model)
    pos = torch.zeros(1, dtype=torch.long, device=device)

    def step(tokens, position):
        pos.fill_(position)
        with torch.no_grad():
            return compiled(input_ids=tokens, cache_position=pos, use_cache=True, logits_to_keep=1, **{kwarg: cache})

    return step


def run_bf16(model, batch, context, args, device):
    cache = StaticCache(config=model.config, max_cache_len=context + args.warmup + args.steps + 1)
    fill_static(cache, model, batch, context, device)
    compiled = torch.compile(model.forward, mode=args.mode, fullgraph=True) if args.mode != "eager" else model.forward
    tokens = torch.ones(batch, 1, dtype=torch.long, device=device)
    first, ms = decode_timing(make_step(model, cache, compiled, device), tokens, context, args.steps, args.warmup, device)
    return first, ms


def run_oscar(model, batch, context, args, device, config):
    cache = OScaRCache(model.config, max_cache_len=context + args.warmup + args.steps + 1, oscar_config=config)
    fill_oscar(cache, model, batch, context, device)
    tokens = torch.ones(batch, 1, dtype=torch.long, device=device)
    first, ms = decode_timing(make_step(model, cache, model, device), tokens, context, args.steps, args.warmup, device)
    return first, ms, cache.memory_report()


def peak_memory(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def reset_peak(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="8b")
    p.add_argument("--contexts", type=int, nargs="*", default=[8192, 32768, 131072])
    p.add_argument("--batches", type=int, nargs="*", default=[1])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode for both paths, or 'eager'")
    p.add_argument("--methods", nargs="*", default=["bf16", "oscar"])
    p.add_argument("--config", choices=["paper", "default"], default="paper",
                   help="OScaR preset; speed does not depend on it (key flags are read per head at run time)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.mode == "reduce-overhead":
        args.mode = "default"

    bw = copy_bandwidth(device)
    model = build_model(args.model, device)
    wbytes = weight_bytes(model)
    config = OScaRConfig.paper() if args.config == "paper" else OScaRConfig()
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"model {args.model} ({wbytes / 1e9:.2f} GB bf16 weights), copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)

    grid = [(b, c) for b in args.batches for c in args.contexts]
    results = {}
    # bf16 first, on the untouched model; then oscar.compile rewrites the same model in place
    for method in [m for m in ("bf16", "oscar") if m in args.methods]:
        if method == "oscar":
            torch._dynamo.reset()
            compile_kwargs = {"mode": args.mode} if args.mode not in ("eager", "default") else {}
            oscar.compile(model, config, fullgraph=True, **compile_kwargs)
        for batch, context in grid:
            reset_peak(device)
            try:
                if method == "bf16":
                    first, ms = run_bf16(model, batch, context, args, device)
                    extra = ""
                else:
                    first, ms, mem = run_oscar(model, batch, context, args, device, config)
                    extra = f"KV {mem['oscar_bytes'] / 2**30:.2f} vs {mem['static_cache_bytes'] / 2**30:.2f} GiB"
                results[batch, context, method] = (ms, first, peak_memory(device), extra)
            except torch.OutOfMemoryError:
                results[batch, context, method] = None
            print(method, batch, context, results[batch, context, method], flush=True)

    rows = []
    for batch, context in grid:
        floors = {m: (wbytes + kv_read_bytes(model, batch, context, m, config)) / bw * 1e3 for m in ("bf16", "oscar")}
        for method in args.methods:
            r = results.get((batch, context, method))
            if r is None:
                rows.append([args.model, batch, context, method, "OOM"] + [""] * 6)
                continue
            ms, first, peak, extra = r
            rows.append([args.model, batch, context, method, f"{ms:.2f}", f"{floors['bf16']:.2f}", f"{floors['oscar']:.2f}",
                         f"{ms / floors[method]:.2f}", f"{peak:.1f}", f"{first:.1f}", extra])  # fmt: skip
        both = [results.get((batch, context, m)) for m in ("bf16", "oscar")]
        if all(both):
            rows.append(["", "", "", "speedup", f"{both[0][0] / both[1][0]:.2f}x"] + [""] * 6)
    print(tabulate(rows, headers=["model", "batch", "context", "method", "ms/token", "bf16 floor ms", "INT2 floor ms",
                                  "measured/floor", "peak GiB", "first call s", "KV memory"]))  # fmt: skip


if __name__ == "__main__":
    main()
