"""End-to-end decode latency, throughput, memory and prefill: transformers StaticCache (bf16) vs oscar.compile,
or, with ``--mode uncompiled``, the same caches with no torch.compile anywhere.

Llama-architecture models with **random bf16 weights** (speed does not depend on the weights). KV caches
are filled synthetically to save device time: the bf16 ``StaticCache`` gets random keys/values written
into its tensors; the OScaR cache gets random keys/values appended through the real quantize-on-write op
(``oscar::append_kv``), so its state is a real quantized cache. Decode steps then run through the compiled
model (``mode="reduce-overhead"``: CUDA graphs, ``fullgraph=True``) and are timed with CUDA events.

``--mode`` says what is measured:

* a ``torch.compile`` mode (``reduce-overhead``, the default; ``default``; ``max-autotune``, ...): bf16 is
  ``torch.compile(model.forward, mode=...)`` with a ``StaticCache``, OScaR is ``oscar.compile(model, mode=...)``.
* ``uncompiled``: what a user who never compiles gets. bf16 is the plain model with a ``StaticCache``
  (method ``bf16``) or a ``DynamicCache`` (method ``dynamic``, grown by concatenation each step); OScaR is
  ``use_oscar_cache(model)`` with an ``OScaRCache`` (its ops launch the Triton kernels directly on CUDA).
  (The former ``--mode eager`` still went through ``oscar.compile``: it is gone.)

Phases (``--phases``; every phase runs the bf16 methods first, on the untouched model, then ``oscar.compile``
(or ``use_oscar_cache``) changes the same model in place and the OScaR runs follow):

* ``decode``: ms/token at each batch x context. bf16 gets a ``StaticCache`` sized to the context (its best
  case: StaticCache attention reads the whole capacity every step); OScaR one cache per batch sized for the
  longest context, filled further between contexts (its attention reads only the stored tokens).
* ``throughput``: tokens/s at ``--throughput-context`` for the largest batch each method fits in GPU memory,
  and for OScaR at bf16's largest batch (equal batch). The largest batch: start from the free memory after
  loading the model over the exact per-sequence cache bytes, run one *eager* decode step there (stepping
  down 10% per out-of-memory error; eager OOMs are recoverable, those inside CUDA-graph recording are
  not), then time the compiled model at 90% of the batch that passed (room for the graph pools).
* ``prefill``: eager forward of one prompt (batch 1): bf16 with a ``DynamicCache`` (SDPA, is_causal:
  transformers' fastest prefill) vs OScaR (attention over the prompt + quantize-on-write of it), plus the
  quantize-on-write op alone (``oscar::append_kv`` of the prompt's keys/values, every layer).
* ``profile``: ``torch.profiler`` over a few graph-replayed decode steps at ``--profile-point``: device
  time per step by kernel category and the top kernels, and host-synchronizing CUDA calls per step.

Floors: bytes one decode step must read (weights + KV state) at the device-to-device copy bandwidth
measured in the same run (read + write bytes / time of a 1 GiB copy).

Usage (GPU; each call fits the device tool's 10-minute limit):
    python benchmarks/e2e.py --model 8b --methods bf16 --json $OUT/bf16.json
    python benchmarks/e2e.py --model 8b --methods oscar --json $OUT/oscar.json
    python benchmarks/e2e.py --report bf16.json oscar.json      # one table from several runs
    python benchmarks/e2e.py --model 8b --mode uncompiled --methods bf16 dynamic oscar --batches 1 \\
        --contexts 8192 32768 --phases decode --json $OUT/uncompiled.json
CPU smoke test (tiny model, no CUDA graphs; add ``--mode uncompiled --methods bf16 dynamic oscar`` for that path):
    python benchmarks/e2e.py --model tiny --contexts 256 512 --batches 1 2 --steps 2 --warmup 1 \\
        --throughput-context 128 --prefill-lengths 64
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import time
from collections import defaultdict

import torch
from tabulate import tabulate
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import oscar_compile as oscar
from oscar_compile import OScaRConfig, ops
from oscar_compile.hf_cache import OScaRCache, cache_kwarg_name, use_oscar_cache
from oscar_compile.kernels import CacheFormat, allocate_cache, cache_nbytes
from oscar_compile.kv_tensor import cache_tensors

MODELS = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}  # fmt: skip
GiB = 2**30
METHODS = ("bf16", "dynamic", "oscar")  # run in this order: the bf16 caches first, on the untouched model
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs")


def kv_kind(method: str) -> str:
    """The bytes a method's cache holds: "bf16" (StaticCache and DynamicCache alike) or "oscar"."""
    return "oscar" if method == "oscar" else "bf16"


def random_llama(cfg: LlamaConfig, device: str) -> LlamaForCausalLM:
    """``cfg`` with random bf16 weights (seed 0) built on ``device``, in eval mode."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(default)
    return model.eval()


def build_model(name: str, device: str) -> LlamaForCausalLM:
    cfg = LlamaConfig(**MODELS[name], max_position_embeddings=262144, head_dim=None)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    return random_llama(cfg, device)


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
    del src, dst
    return 2 * n / (ms * 1e-3)


def layer_shapes(model):
    cfg = model.config
    return cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim


def oscar_format(config: OScaRConfig) -> CacheFormat:
    return CacheFormat(config.bits, config.group_size, config.residual_length, config.rotate_values)


def kv_read_bytes(model, batch: int, context: int, method: str, config: OScaRConfig) -> int:
    """Bytes of KV state one decode step must read at ``context`` stored tokens."""
    layers, heads, d = layer_shapes(model)
    if kv_kind(method) == "bf16":
        return 2 * layers * batch * heads * context * d * 2
    r = config.residual_length
    quantized = context // r * r
    per_layer = cache_nbytes(allocate_cache(batch, heads, max(quantized, r), d, oscar_format(config), torch.bfloat16, "meta"))
    per_layer -= 2 * batch * heads * r * d * 2  # residual buffers: count what is read below
    per_layer = per_layer * quantized // max(quantized, r) + 2 * batch * heads * (context - quantized) * d * 2
    return layers * per_layer


def cache_bytes_per_sequence(model, capacity: int, method: str, config: OScaRConfig) -> int:
    """Bytes one sequence's cache holds at ``capacity`` positions (what limits the batch)."""
    layers, heads, d = layer_shapes(model)
    if kv_kind(method) == "bf16":
        return 2 * layers * heads * capacity * d * 2
    r = config.residual_length
    cap = -(-capacity // r) * r
    return layers * cache_nbytes(allocate_cache(1, heads, cap, d, oscar_format(config), torch.bfloat16, "meta"))


def sdpa_packed_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """A bf16 attention for transformers: its SDPA, but a decode step's query heads are packed per kv
    head (``[B, Hq, 1, D]`` -> ``[B, Hkv, group, D]``, a view) also under torch.compile, so K/V are read
    once. transformers does this only eagerly; compiled, a masked decode step copies K/V ``group`` times
    (``repeat_kv``). Multi-token steps: transformers' own function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    group = getattr(module, "num_key_value_groups", 1)
    b, hq, t, d = query.shape
    if t != 1 or group == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    packed = query.reshape(b, hq // group, group, d)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None


def set_bf16_attention(model, name: str):
    """``sdpa`` (transformers' default) or ``sdpa_packed`` (:func:`sdpa_packed_gqa`). (transformers'
    ``flex_attention`` path would be a third candidate, but with torch 2.13 / transformers 5.24 it breaks
    ``fullgraph``: transformers calls ``create_block_mask(_compile=True)``, which now warns.)"""
    if name == "sdpa_packed":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(name, sdpa_packed_gqa)
        AttentionMaskInterface.register(name, sdpa_mask)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def floors_ms(model, batch, context, config, bw) -> dict:
    w = weight_bytes(model)
    return {m: (w + kv_read_bytes(model, batch, context, m, config)) / bw * 1e3 for m in ("bf16", "oscar")}


# ---------------------------------------------------------------------------------------------------
# caches


def fill_static(cache: StaticCache, model, batch: int, context: int, device: str):
    layers, heads, d = layer_shapes(model)
    gen = torch.Generator(device=device).manual_seed(1)
    for layer in cache.layers:
        k = torch.empty(batch, heads, 1, d, dtype=torch.bfloat16, device=device)
        if not layer.is_initialized:
            layer.lazy_initialization(k, k)
        layer.keys[:, :, :context].normal_(generator=gen)
        layer.values[:, :, :context].normal_(generator=gen)
        # StaticLayer.update writes at its own counter (transformers 5.17 ignores cache_position there):
        # without this the timed steps would overwrite positions 0, 1, ... instead of appending at `context`
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length.fill_(context)


def fill_dynamic(cache: DynamicCache, model, batch: int, context: int, device: str):
    layers, heads, d = layer_shapes(model)
    gen = torch.Generator(device=device).manual_seed(1)
    for i in range(layers):
        k, v = (torch.randn(batch, heads, context, d, dtype=torch.bfloat16, device=device, generator=gen) for _ in "kv")
        cache.update(k, v, i)


def fill_oscar(cache: OScaRCache, model, batch: int, context: int, device: str):
    """Append random tokens per layer through the real quantize-on-write op until ``context`` are stored."""
    layers, heads, d = layer_shapes(model)
    chunk = max(128, min(4096, 32768 // batch))  # bounded scratch at large batches
    gen = torch.Generator(device=device).manual_seed(1)
    for layer in cache.oscar_layers:
        k = torch.empty(batch, heads, 1, d, dtype=torch.bfloat16, device=device)
        if not layer.is_initialized:
            layer.lazy_initialization(k, k)
        ct = cache_tensors(layer.keys, layer.values)
        fmt = layer.keys.fmt
        for start in range(layer.host_length, context, chunk):
            n = min(chunk, context - start)
            nk = torch.randn(batch, heads, n, d, dtype=torch.bfloat16, device=device, generator=gen)
            nv = torch.randn(batch, heads, n, d, dtype=torch.bfloat16, device=device, generator=gen)
            ops.append_kv(ct, fmt, nk, nv)
        layer.values.lengths.copy_(layer.keys.lengths)
        layer.cumulative_length.fill_(context)
        layer.host_length, layer._host_stale = context, False
        layer.first_step = False  # tokens are stored: the next step must not promise an empty layer


# ---------------------------------------------------------------------------------------------------
# timing


def make_step(model, cache, forward, device):
    kwarg = cache_kwarg_name(model)
    pos = torch.zeros(1, dtype=torch.long, device=device)

    def step(tokens, position):
        pos.fill_(position)
        with torch.no_grad():
            return forward(input_ids=tokens, cache_position=pos, use_cache=True, logits_to_keep=1, **{kwarg: cache})

    return step


def decode_timing(step, tokens, position: int, steps: int, warmup: int, device: str):
    """``warmup`` + ``steps`` decode steps from ``position``; returns (first-call s, mean ms/step)."""
    t0 = time.perf_counter()
    step(tokens, position)
    sync(device)
    first = time.perf_counter() - t0
    for i in range(1, warmup):
        step(tokens, position + i)
    sync(device)
    t0 = time.perf_counter()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for i in range(steps):
        step(tokens, position + warmup + i)
    if device == "cuda":
        end.record()
        torch.cuda.synchronize()
        return first, start.elapsed_time(end) / steps
    return first, (time.perf_counter() - t0) * 1e3 / steps


def reset_memory(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / GiB if device == "cuda" else float("nan")


def free_bytes(device) -> int:
    if device != "cuda":
        return 1 << 62
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


class Runner:
    """Holds the model, the compiled forward of the current method and the run's results."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.config = OScaRConfig.paper() if args.config == "paper" else OScaRConfig()
        self.bw = copy_bandwidth(device)
        self.model = build_model(args.model, device)
        self.results = {"meta": self.meta(), "decode": [], "throughput": [], "prefill": [], "profile": []}
        self.method = None
        self.forward = None

    def meta(self):
        import transformers
        import triton

        a = self.args
        return {
            "device": torch.cuda.get_device_name() if self.device == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "model": a.model, "weights_gb": weight_bytes(self.model) / 1e9, "copy_tb_s": self.bw / 1e12,
            "mode": a.mode, "config": a.config, "bf16_attention": a.bf16_attention, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }  # fmt: skip

    def use(self, method):
        """Switch to ``method``. Compiled modes: bf16 = torch.compile of the plain model, oscar = oscar.compile
        (in place). ``uncompiled``: the plain model's forward; oscar = ``use_oscar_cache`` (in place)."""
        if method == self.method:
            return
        if self.method == "oscar":
            raise RuntimeError("bf16 runs must come before OScaR changes the model")
        a = self.args
        torch._dynamo.reset()
        uncompiled = a.mode == "uncompiled"
        if method != "oscar":
            set_bf16_attention(self.model, a.bf16_attention)
            fwd = self.model.forward
            self.forward = fwd if uncompiled else torch.compile(fwd, mode=a.mode, fullgraph=True)
        elif uncompiled:
            use_oscar_cache(self.model, self.config)
            self.forward = self.model.forward
        else:
            kw = {"mode": a.mode} if a.mode != "default" else {}
            oscar.compile(self.model, self.config, fullgraph=True, **kw)
            self.forward = self.model
        self.method = method

    def new_cache(self, batch, capacity):
        if self.method == "bf16":
            return StaticCache(config=self.model.config, max_cache_len=capacity)
        if self.method == "dynamic":
            return DynamicCache(config=self.model.config)
        return OScaRCache(self.model.config, max_cache_len=capacity, oscar_config=self.config)

    def fill(self, cache, batch, context):
        fill = {"bf16": fill_static, "dynamic": fill_dynamic, "oscar": fill_oscar}[self.method]
        fill(cache, self.model, batch, context, self.device)

    def fits(self, batch, capacity) -> tuple[bool, float]:
        need = batch * cache_bytes_per_sequence(self.model, capacity, self.method, self.config)
        return need < free_bytes(self.device) - self.args.reserve_gib * GiB, need / GiB

    def time_decode(self, cache, batch, context):
        a = self.args
        tokens = torch.ones(batch, 1, dtype=torch.long, device=self.device)
        step = make_step(self.model, cache, self.forward, self.device)
        return decode_timing(step, tokens, context, a.steps, a.warmup, self.device)

    # phases -----------------------------------------------------------------------------------------

    def decode(self):
        a = self.args
        margin = a.warmup + a.steps + 1
        for batch in a.batches:
            cache = None
            if self.method == "oscar":  # one cache, filled further per context
                capacity = max(a.contexts) + margin * len(a.contexts)
                ok, need = self.fits(batch, capacity)
                cache = self.new_cache(batch, capacity) if ok else None
            for context in sorted(a.contexts):
                reset_memory(self.device)
                row = {"method": self.method, "batch": batch, "context": context}
                if self.method != "oscar":
                    ok, need = self.fits(batch, context + margin)
                    cache = self.new_cache(batch, context + margin) if ok else None
                if cache is None:
                    row["oom"] = f"needs {need:.1f} GiB of cache"
                else:
                    self.fill(cache, batch, context)
                    first, ms = self.time_decode(cache, batch, context)
                    row.update(ms=ms, first_s=first, peak_gib=peak_gib(self.device))
                    if self.method == "oscar":
                        context_now = context + a.warmup + a.steps  # the next fill continues from here
                        for layer in cache.oscar_layers:
                            layer.host_length, layer._host_stale = context_now, False
                row["floors"] = floors_ms(self.model, batch, context, self.config, self.bw)
                self.results["decode"].append(row)
                print("decode", row, flush=True)
                if self.method != "oscar":
                    cache = None
            del cache

    def throughput(self):
        a = self.args
        ctx = a.throughput_context
        capacity = ctx + a.warmup + a.steps + 1
        per_seq = cache_bytes_per_sequence(self.model, capacity, self.method, self.config)
        reset_memory(self.device)
        room = free_bytes(self.device) - a.reserve_gib * GiB
        largest = max(1, int(room // per_seq)) if self.device == "cuda" else a.cpu_max_batch
        batches = [("max", largest)]
        bf16_max = next((r["batch"] for r in self.results["throughput"] if r["method"] == "bf16" and r["kind"] == "max"), None)
        if bf16_max is None and a.equal_batch:
            bf16_max = a.equal_batch
        if self.method == "oscar" and bf16_max:
            batches.insert(0, ("equal", bf16_max))
        for kind, batch in batches:
            if kind == "max" and self.device == "cuda":
                batch = max(1, int(self.largest_eager_batch(batch, capacity, ctx) * 0.9))
            reset_memory(self.device)
            row = {"method": self.method, "kind": kind, "batch": batch, "context": ctx, "cache_gib": batch * per_seq / GiB,
                   "floors": floors_ms(self.model, batch, ctx, self.config, self.bw)}  # fmt: skip
            try:
                cache = self.new_cache(batch, capacity)
                self.fill(cache, batch, ctx)
                first, ms = self.time_decode(cache, batch, ctx)
                row.update(ms=ms, tok_s=batch / ms * 1e3, first_s=first, peak_gib=peak_gib(self.device))
            except torch.OutOfMemoryError:
                row["oom"] = "out of memory in the compiled run"
            self.results["throughput"].append(row)
            print("throughput", row, flush=True)
            cache = None

    def largest_eager_batch(self, batch: int, capacity: int, ctx: int) -> int:
        """Largest batch (from ``batch`` down, -10% per try) whose eager decode step fits in memory."""
        kwarg = cache_kwarg_name(self.model)
        while batch > 1:
            reset_memory(self.device)
            cache = None
            try:
                cache = self.new_cache(batch, capacity)
                tokens = torch.ones(batch, 1, dtype=torch.long, device=self.device)
                with torch.no_grad():
                    self.model.forward(input_ids=tokens, cache_position=torch.tensor([ctx], device=self.device),
                                       use_cache=True, logits_to_keep=1, **{kwarg: cache})  # fmt: skip
                sync(self.device)
                return batch
            except torch.OutOfMemoryError:
                print(f"throughput {self.method}: eager step at batch {batch} out of memory", flush=True)
                batch = int(batch * 0.9)
            finally:
                del cache
        return batch

    def prefill(self):
        """Eager prefill of one prompt per length, batch 1; median of ``--prefill-reps`` after one warm-up."""
        a = self.args
        layers, heads, d = layer_shapes(self.model)
        forward = self.model.forward  # eager (oscar.compile only replaces __call__'s compiled path)
        if self.method == "dynamic":
            return  # bf16's prefill already runs on a DynamicCache
        for length in a.prefill_lengths:
            reset_memory(self.device)
            ids = torch.randint(0, self.model.config.vocab_size, (1, length), device=self.device)
            times = []
            for _ in range(a.prefill_reps + 1):
                cache = DynamicCache() if self.method == "bf16" else self.new_cache(1, length + 1)
                sync(self.device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    forward(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg_name(self.model): cache})
                sync(self.device)
                times.append(time.perf_counter() - t0)
                del cache
            row = {"method": self.method, "length": length, "ms": sorted(times[1:])[len(times[1:]) // 2] * 1e3,
                   "peak_gib": peak_gib(self.device)}  # fmt: skip
            if self.method == "oscar":  # the quantize-on-write op alone: every layer's append of the prompt
                fmt = oscar_format(self.config)
                caches = [allocate_cache(1, heads, -(-length // fmt.residual_length) * fmt.residual_length, d, fmt,
                                         torch.bfloat16, self.device) for _ in range(layers)]  # fmt: skip
                k = torch.randn(1, heads, length, d, dtype=torch.bfloat16, device=self.device)
                reps = []
                for _ in range(a.prefill_reps + 1):
                    for c in caches:
                        c.lengths.zero_()
                    sync(self.device)
                    t0 = time.perf_counter()
                    for c in caches:
                        ops.append_kv(c, fmt, k, k)
                    sync(self.device)
                    reps.append(time.perf_counter() - t0)
                row["append_ms"] = sorted(reps[1:])[len(reps[1:]) // 2] * 1e3
                del caches
            self.results["prefill"].append(row)
            print("prefill", row, flush=True)

    def profile(self):
        a = self.args
        batch, context = a.profile_point
        reset_memory(self.device)
        capacity = context + a.warmup + a.steps + 16
        if not self.fits(batch, capacity)[0]:
            return
        cache = self.new_cache(batch, capacity)
        self.fill(cache, batch, context)
        tokens = torch.ones(batch, 1, dtype=torch.long, device=self.device)
        step = make_step(self.model, cache, self.forward, self.device)
        decode_timing(step, tokens, context, 2, a.warmup, self.device)  # compiled and warm
        n = 5
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.device == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for i in range(n):
                step(tokens, context + a.warmup + 2 + i)
            sync(self.device)
        row = {"method": self.method, "batch": batch, "context": context, **summarize_profile(prof, n, self.device)}
        self.results["profile"].append(row)
        print("profile", json.dumps(row, indent=1), flush=True)
        del cache


KERNEL_CATEGORIES = [  # first match wins; names from the H200 traces (cuBLAS/cuDNN/flash/Inductor/ours)
    ("oscar attention", r"_cache_attn|cache_attention"),
    ("oscar append (quantize-on-write)", r"_append|append_kv"),
    ("bf16 attention (SDPA)", r"flash|fmha|attention|cudnn|sdpa"),
    ("GEMM/GEMV (cuBLAS)", r"gemm|gemv|nvjet|cutlass|sm90_xmma|splitk|cublas"),
    ("Inductor fused (norms, rope, etc.)", r"^triton_"),
]
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def summarize_profile(prof, steps: int, device: str) -> dict:
    """Device microseconds per step by category and for the top kernels; host-sync CUDA calls per step."""
    per_kernel, syncs, launches, sync_names = defaultdict(float), 0, 0, defaultdict(int)
    for evt in prof.events():
        name = evt.name
        if device == "cuda" and evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[name] += evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
        if evt.device_type == torch.autograd.DeviceType.CPU:
            if any(name.startswith(s) for s in SYNC_CALLS) and "Async" not in name:
                syncs += 1
                sync_names[name] += 1
            if name.startswith("cudaGraphLaunch"):
                launches += 1
    categories = defaultdict(float)
    for name, us in per_kernel.items():
        cat = next((c for c, pat in KERNEL_CATEGORIES if re.search(pat, name, re.IGNORECASE)), "other")
        categories[cat] += us / steps
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "device_us_per_step": sum(per_kernel.values()) / steps,
        "categories_us_per_step": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
        "top_kernels_us_per_step": [(n[:90], us / steps) for n, us in top],
        # the last sync is the profiler block's own torch.cuda.synchronize()
        "host_syncs_per_step": max(0, syncs - 1) / steps,
        "sync_calls_total": dict(sync_names),
        "graph_launches_per_step": launches / steps,
    }


# ---------------------------------------------------------------------------------------------------
# report


def report(results: list[dict]):
    """Print one table per phase from one or more runs' results (each row keeps its own run's floors)."""
    metas = [r["meta"] for r in results]
    for m in metas:
        print(f"run: {m['date']}, {m['device']}, torch {m['torch']}, triton {m['triton']}, transformers "
              f"{m['transformers']}, model {m['model']} ({m['weights_gb']:.2f} GB bf16 weights, random), "
              f"copy bandwidth {m['copy_tb_s']:.2f} TB/s, mode {m['mode']}, OScaR config {m['config']}, "
              f"bf16 attention {m.get('bf16_attention', 'sdpa')}")  # fmt: skip

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else ""

    dec = {(r["batch"], r["context"], r["method"]): r for res in results for r in res["decode"]}
    dynamic = any(m == "dynamic" for _, _, m in dec)
    rows = []
    for b, c in sorted({(b, c) for b, c, _ in dec}):
        bf, dy, os_ = dec.get((b, c, "bf16")), dec.get((b, c, "dynamic")), dec.get((b, c, "oscar"))
        fl = (os_ or bf or dy)["floors"]

        def cell(r, key, fmt):
            return "" if r is None else r.get("oom", "OOM")[:24] if "ms" not in r else fmt.format(r[key])

        rows.append([b, c, cell(bf, "ms", "{:.2f}"), cell(os_, "ms", "{:.2f}"),
                     ratio(bf and bf.get("ms"), os_ and os_.get("ms")), f"{fl['bf16']:.2f}", f"{fl['oscar']:.2f}",
                     ratio(bf and bf.get("ms"), fl["bf16"]), ratio(os_ and os_.get("ms"), fl["oscar"]),
                     cell(bf, "peak_gib", "{:.1f}") + " / " + cell(os_, "peak_gib", "{:.1f}"),
                     cell(bf, "first_s", "{:.1f}") + " / " + cell(os_, "first_s", "{:.1f}")]
                    + ([cell(dy, "ms", "{:.2f}"), ratio(dy and dy.get("ms"), os_ and os_.get("ms"))] if dynamic else []))  # fmt: skip
    if rows:
        modes = sorted({m["mode"] for m in metas})
        print(f"\n(a) decode ms/token (mean of timed steps; mode {', '.join(modes)}: "
              f"{'CUDA graphs' if 'reduce-overhead' in modes else 'no CUDA graphs'})")
        print(tabulate(rows, headers=["batch", "context", "bf16 ms (StaticCache)", "OScaR ms", "speedup", "bf16 floor",
                                      "INT2 floor", "bf16/floor", "OScaR/floor", "peak GiB bf16/OScaR",
                                      "first call s bf16/OScaR"]
                       + (["DynamicCache ms", "speedup vs DynamicCache"] if dynamic else []), tablefmt="github"))  # fmt: skip
    thr = [r for res in results for r in res["throughput"]]
    if thr:
        best_bf16 = max((r["tok_s"] for r in thr if r["method"] == "bf16" and "tok_s" in r), default=None)
        rows = [[r["method"], r["kind"], r["batch"], r["context"], f"{r['ms']:.2f}", f"{r['tok_s']:.0f}",
                 ratio(r["tok_s"], best_bf16), f"{r['floors'][kv_kind(r['method'])]:.2f}", ratio(r["ms"], r["floors"][kv_kind(r["method"])]),
                 f"{r['cache_gib']:.1f}", f"{r['peak_gib']:.1f}", f"{r['first_s']:.1f}"] if "ms" in r else
                [r["method"], r["kind"], r["batch"], r["context"], r.get("oom", "")] + [""] * 7 for r in thr]  # fmt: skip
        print("\n(b) decode throughput")
        print(tabulate(rows, headers=["method", "batch kind", "batch", "context", "ms/step", "tokens/s",
                                      "vs bf16 max", "floor ms", "measured/floor", "cache GiB", "peak GiB",
                                      "first call s"], tablefmt="github"))  # fmt: skip
    pre = {(r["length"], r["method"]): r for res in results for r in res["prefill"]}
    rows = []
    for length in sorted({n for n, _ in pre}):
        bf, os_ = pre.get((length, "bf16")), pre.get((length, "oscar"))
        rows.append([length, f"{bf['ms']:.1f}" if bf else "", f"{os_['ms']:.1f}" if os_ else "",
                     f"{(os_['ms'] / bf['ms'] - 1) * 100:+.1f}%" if bf and os_ else "",
                     f"{os_['append_ms']:.2f}" if os_ else "",
                     f"{os_['append_ms'] / bf['ms'] * 100:.2f}%" if bf and os_ else ""])  # fmt: skip
    if rows:
        print("\n(d) prefill, batch 1, eager (median)")
        print(tabulate(rows, headers=["prompt", "bf16 ms (DynamicCache, SDPA)", "OScaR ms", "OScaR overhead",
                                      "quantize-on-write ms (all layers)", "quantize-on-write / bf16 prefill"],
                       tablefmt="github"))  # fmt: skip
    for res in results:
        for p in res["profile"]:
            print(f"\nprofile: {p['method']} batch {p['batch']} context {p['context']}: device "
                  f"{p['device_us_per_step']:.0f} us/step, host syncs/step {p['host_syncs_per_step']:.1f}, "
                  f"graph launches/step {p['graph_launches_per_step']:.1f}, sync calls in the "
                  f"profiled block (incl. its final synchronize) {p.get('sync_calls_total')}")  # fmt: skip
            print(tabulate([[c, f"{us:.0f}"] for c, us in p["categories_us_per_step"].items()],
                           headers=["category", "us/step"], tablefmt="github"))  # fmt: skip
            print(tabulate([[n, f"{us:.1f}"] for n, us in p["top_kernels_us_per_step"]],
                           headers=["kernel", "us/step"], tablefmt="github"))  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="8b")
    p.add_argument("--phases", nargs="*", default=["decode", "throughput", "prefill", "profile"],
                   choices=["decode", "throughput", "prefill", "profile"])
    p.add_argument("--methods", nargs="*", default=["bf16", "oscar"], choices=METHODS,
                   help="bf16: StaticCache; dynamic: DynamicCache (--mode uncompiled only); oscar: OScaRCache")
    p.add_argument("--contexts", type=int, nargs="*", default=[8192, 32768, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--throughput-context", type=int, default=4096)
    p.add_argument("--equal-batch", type=int, default=None, help="OScaR's equal-batch point when bf16 is not run")
    p.add_argument("--reserve-gib", type=float, default=8.0, help="memory kept free for activations/graph pools")
    p.add_argument("--cpu-max-batch", type=int, default=4)
    p.add_argument("--prefill-lengths", type=int, nargs="*", default=[4096, 32768])
    p.add_argument("--prefill-reps", type=int, default=3)
    p.add_argument("--profile-point", type=int, nargs=2, default=[1, 131072], metavar=("BATCH", "CONTEXT"))
    p.add_argument("--mode", default="reduce-overhead",
                   help=f"torch.compile mode of both paths ({', '.join(COMPILE_MODES)}; oscar.compile for OScaR), "
                        "or 'uncompiled': no torch.compile (plain model; use_oscar_cache + OScaRCache for OScaR)")
    p.add_argument("--config", choices=["paper", "default"], default="paper",
                   help="OScaR preset; speed does not depend on it (key flags are read per head at run time)")
    p.add_argument("--bf16-attention", choices=["sdpa", "sdpa_packed"], default="sdpa",
                   help="bf16 baseline's attention: transformers' default SDPA path (copies K/V for GQA when "
                        "compiled) or SDPA with the decode query packed per kv head (no copy)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--report", nargs="*", help="print the tables of earlier --json results and exit")
    args = p.parse_args()
    if args.mode == "eager":
        p.error("--mode eager is gone (it still ran oscar.compile): --mode uncompiled measures OScaRCache without "
                "torch.compile against the plain model's StaticCache (bf16) and DynamicCache (dynamic)")
    if args.mode not in (*COMPILE_MODES, "uncompiled"):
        p.error(f"--mode must be one of {(*COMPILE_MODES, 'uncompiled')}, got {args.mode!r}")
    if "dynamic" in args.methods and args.mode != "uncompiled":
        p.error("--methods dynamic needs --mode uncompiled (a DynamicCache grows every step: compiled, it recompiles)")
    if args.report:
        report([json.load(open(f)) for f in args.report])
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.mode == "reduce-overhead":
        args.mode = "default"
    run = Runner(args, device)
    print(run.results["meta"], flush=True)
    for method in [m for m in METHODS if m in args.methods]:
        run.use(method)
        for phase in ("prefill", "decode", "throughput", "profile"):  # prefill first: eager, no compile state
            if phase in args.phases:
                getattr(run, phase)()
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(run.results, f, indent=1)
    report([run.results])


if __name__ == "__main__":
    main()
