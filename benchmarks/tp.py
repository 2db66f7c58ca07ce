"""Tensor-parallel decode: transformers TP (``tp_plan="auto"``) with a bf16 StaticCache vs ``oscar.compile`` (issue 15).

Run under torchrun, one process per GPU (NCCL); without torchrun (or ``--nproc-per-node 1``) it measures the
same models on one GPU, with no TP, for comparison:

    torchrun --standalone --nproc-per-node 2 benchmarks/tp.py --json $OUT/tp2.json     # 2 GPUs
    python benchmarks/tp.py --json $OUT/tp1.json                                        # 1 GPU
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/tp.py --smoke  # CPU, gloo, tiny model

Models: Llama-3.1-8B-shaped and Llama-3-70B-shaped (hidden size, heads, kv heads, MLP width, vocabulary of the
real ones) with **random bf16 weights** and **the layer count reduced** (``--layers`` 8 of 32, ``--layers-70b`` 4 of 80:
device time and disk), built once and saved by rank 0, loaded by every rank with ``from_pretrained(...,
tp_plan="auto")``. Both caches are filled synthetically to the context (bf16: random keys/values; OScaR:
random keys/values through the real quantize-on-write op), then decode steps run through the compiled model
(``--mode reduce-overhead``: CUDA graphs; bf16 ``torch.compile(fullgraph=True)`` with packed-GQA SDPA, the
stronger bf16 baseline of benchmarks/e2e.py; OScaR ``oscar.compile(mode=...)``) and are timed with CUDA events.

Also per rank: the OScaR cache's bytes next to every rank's (``tensor_parallel.memory_report``), the largest
batch each cache fits at each context *at full depth* (computed from the exact per-rank bytes per sequence and
layer, the full model's per-rank weight bytes, the GPU's total memory and ``--reserve-gib``; not run), and the
cost of the alternative key norm (``tensor_parallel``, "Key norm across ranks"): one ``[B, 1]`` fp32
all-reduce per layer per step, captured in a CUDA graph, next to the model's own ``[B, 1, hidden]`` bf16 one.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are
forced below; the device notes say why). The last thing printed (rank 0) is a short table.
"""

from __future__ import annotations

import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_name] = _value  # before torch/NCCL start: multicast can take the host's GPUs out of service

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from e2e import (  # noqa: E402  (benchmarks/e2e.py: one owner for fills, steps and timing)
    MODELS,
    cache_bytes_per_sequence,
    decode_timing,
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
from oscar_compile.hf_cache import OScaRCache  # noqa: E402

SHAPES = {
    "8b": dict(MODELS["8b"], full_layers=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, full_layers=80),
    "tiny": dict(MODELS["tiny"], full_layers=2),
}  # fmt: skip
GiB = 2**30


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
    [B, 1, hidden] bf16, each sequence captured in a CUDA graph, replay timed (us)."""
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
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        out[name] = start.elapsed_time(end) * 1e3 / 20
    return out


def run_model(name: str, args, device: str, config: OScaRConfig, workdir: Path) -> list[dict]:
    t0 = time.perf_counter()
    model = build(name, args.layers_70b if name == "70b" else args.layers, device, workdir)
    log(f"{name}: built/loaded in {time.perf_counter() - t0:.0f}s, {model.config.num_hidden_layers} layers, "
        f"{tensor_parallel.tp_info(model).kv_heads} kv heads per rank")
    view = rank_view(model)
    full = SHAPES[name]["full_layers"]
    layers = model.config.num_hidden_layers
    margin = args.warmup + args.steps + 1
    total_mem = torch.cuda.mem_get_info()[1] if device == "cuda" else 64 * GiB
    weights_full = full_depth_weight_bytes(model, full)
    rows = []
    for method in ("bf16", "oscar"):
        torch._dynamo.reset()
        if method == "bf16":
            set_bf16_attention(model, args.bf16_attention)
            forward = model.forward if args.mode == "eager" else torch.compile(model.forward, mode=args.mode, fullgraph=True)
        else:
            kw = {"mode": args.mode} if args.mode not in ("eager", "default") else {}
            oscar.compile(model, config, fullgraph=True, **kw)
            forward = model
        cache = None
        for context in sorted(args.contexts):
            reset_memory(device)
            if method == "bf16":
                cache = StaticCache(config=model.config, max_cache_len=context + margin)
                cache.early_initialization(args.batch, view.config.num_key_value_heads, model.config.head_dim,
                                           torch.bfloat16, device)  # fmt: skip
                fill_static(cache, view, args.batch, context, device)
            else:
                if cache is None:  # one cache for every context, filled further (attention reads stored tokens only)
                    cache = OScaRCache(model.config, max(args.contexts) + margin * len(args.contexts), config)
                    cache.early_initialization(args.batch, view.config.num_key_value_heads, model.config.head_dim,
                                               torch.bfloat16, device)  # fmt: skip
                fill_oscar(cache, view, args.batch, context, device)
            step = make_step(model, cache, forward, device)
            tokens = torch.ones(args.batch, 1, dtype=torch.long, device=device)
            first, ms = decode_timing(step, tokens, context, args.steps, args.warmup, device)
            row = dict(model=name, layers=layers, full_layers=full, world=WORLD, method=method, batch=args.batch,
                       context=context, ms=ms, first_s=first, peak_gib=peak_gib(device))  # fmt: skip
            per_seq_layer = cache_bytes_per_sequence(
                SimpleNamespace(config=SimpleNamespace(**{**vars(view.config), "num_hidden_layers": 1})),
                context + margin, method, config)  # fmt: skip
            free_full = total_mem - weights_full - args.reserve_gib * GiB
            row["max_batch_full_depth"] = max(0, int(free_full // (per_seq_layer * full)))
            row["cache_gib_per_seq_full_depth"] = per_seq_layer * full / GiB
            if method == "oscar":
                mem = tensor_parallel.memory_report(cache, model)
                row["per_rank_oscar_bytes"] = mem["per_rank_oscar_bytes"]
                row["static_bytes_this_rank"] = mem["static_cache_bytes"]
                tensor_parallel.check_consistent(cache, model)
                for layer in cache.oscar_layers:  # the next fill continues after the timed steps
                    layer.host_length, layer._host_stale = context + args.warmup + args.steps, False
            rows.append(row)
            log("decode", json.dumps(row))
        del cache
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    skips = dict(torch._dynamo.utils.counters["inductor"]).get("cudagraph_skips", 0)
    cost = allreduce_cost_us(model, args.batch, full, device)
    for row in rows:
        row.update(graph_breaks=breaks, cudagraph_skips=skips, allreduce_us_full_depth=cost)
    log(f"{name}: graph breaks {breaks}, cudagraph skips {skips}, all-reduce cost per step at full depth {cost}")
    del model, forward
    reset_memory(device)
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["model"], r["context"], r["method"]): r for r in rows}
    out = []
    for (model, context) in dict.fromkeys((r["model"], r["context"]) for r in rows):
        b, o = by.get((model, context, "bf16")), by.get((model, context, "oscar"))
        if b is None or o is None:
            continue
        norm = o["allreduce_us_full_depth"].get("norm_fp32")
        step_full_us = o["ms"] * 1e3 / o["layers"] * o["full_layers"]  # rough: per-layer share of the step
        out.append([
            f"{model} ({o['layers']}/{o['full_layers']} layers)", o["world"], f"{context // 1024}K" if context >= 1024 else str(context),
            f"{b['ms']:.2f}", f"{o['ms']:.2f}", f"{b['ms'] / o['ms']:.2f}x",
            f"{b['max_batch_full_depth']} / {o['max_batch_full_depth']}",
            "-" if norm is None else f"{norm:.0f} us ({100 * norm / step_full_us:.1f}%)",
        ])  # fmt: skip
    return tabulate(out, headers=["model", "GPUs", "context", "bf16 ms/tok", "OScaR ms/tok", "speedup",
                                  "max batch bf16/OScaR (full depth)", "norm all-reduce/step (full depth)"])  # fmt: skip


def main():
    global RANK, WORLD
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["8b", "70b"], choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=8, help="decoder layers built (8B-shaped: of 32)")
    p.add_argument("--layers-70b", type=int, default=4, help="decoder layers built for the 70B shape (of 80)")
    p.add_argument("--contexts", type=int, nargs="*", default=[32768, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode for both, or 'eager'")
    p.add_argument("--bf16-attention", choices=["sdpa", "sdpa_packed"], default="sdpa_packed")
    p.add_argument("--config", choices=["default", "paper"], default="default")
    p.add_argument("--reserve-gib", type=float, default=8.0, help="memory per GPU kept for activations/graphs")
    p.add_argument("--workdir", default="/tmp/oscar_tp_models", help="where rank 0 saves the random models")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny model, gloo, eager, short contexts")
    p.add_argument("--json", help="write the rows here (rank 0)")
    args = p.parse_args()
    if args.smoke:
        args.models, args.layers, args.contexts, args.steps, args.warmup = ["tiny"], 2, [256, 512], 2, 1
        args.mode = "eager" if args.mode == "reduce-overhead" else args.mode
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
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

    log(f"world {WORLD}, device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, config {config}")  # fmt: skip
    rows = []
    t0 = time.perf_counter()
    for name in args.models:
        rows += run_model(name, args, device, config, Path(args.workdir))
    if RANK == 0:
        if args.json:
            Path(args.json).write_text(json.dumps(dict(rows=rows, seconds=time.perf_counter() - t0), indent=1))
        print(f"\ntotal {time.perf_counter() - t0:.0f}s; max batch: computed at full depth from exact per-rank "
              f"bytes, {args.reserve_gib:g} GiB reserved; norm all-reduce: {args.batch}x1 fp32 per layer, % of the "
              "step scaled to full depth")
        print(table(rows), flush=True)
    if WORLD > 1:
        dist.barrier()
        dist.destroy_process_group()


RANK, WORLD = 0, 1

if __name__ == "__main__":
    main()
