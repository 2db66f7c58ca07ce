"""Tensor parallelism and the omni-token key norm: what a per-rank norm costs in accuracy (issue 15).

Under tensor parallelism each rank holds ``Hkv / W`` kv heads of every layer. DESIGN §2.2 defines the key
norm over *all* kv heads of a layer; a rank can compute it only over its own heads (no collective), or
all-reduce the per-token sum of squares (one ``[B, T]`` fp32 all-reduce per layer per step). The all-reduced
norm reproduces single-GPU numerics exactly, so its accuracy is the single-process row; the per-rank norm is
single-process OScaR applied to each group of ``Hkv / W`` consecutive kv heads on its own (norm, "auto" key
decision and quantization per group; values are per head anyway). This script measures both with the
accuracy harness (``oscar_compile.eval``: continuation perplexity through the decode path, fake
quantization), on the real models of DESIGN §5, at the largest W each model allows (one kv head per rank:
the per-rank norm is then a per-head norm, the furthest from the omni-token one).

    python benchmarks/tp_accuracy.py --model smollm2-135m --world 3 --text pg wiki --context 1024 --windows 8

Prints one Markdown table (perplexity and its change over the bf16 cache) per model and text.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from oscar_compile import OScaRConfig, assets
from oscar_compile.eval import KVMethod, continuation_nll, make_windows, prefill
from oscar_compile.eval import harness
from oscar_compile.eval.caches import FakeQuantLayer, fake_keys, fake_values
from oscar_compile.fake_quant import resolve_key_flags

CONTINUATION = 128
CHUNK = 16


class RankGroupedLayer(FakeQuantLayer):
    """:class:`FakeQuantLayer` whose keys are quantized per group of ``Hkv / world`` consecutive kv heads
    (norm and "auto" decision per group, with the group's query heads): what ``world`` TP ranks compute with
    a per-rank norm."""

    def __init__(self, method: KVMethod, world: int, store_dtype=torch.bfloat16):
        super().__init__(method, store_dtype)
        self.world = world

    def _quantize_blocks(self, start: int, stop: int) -> None:
        cfg, w = self.method.config, self.world
        k, v = self.hist_k[:, :, start:stop], self.hist_v[:, :, start:stop]
        b, h = k.shape[:2]
        hg = h // w
        q = self.prompt_queries
        if self.key_rotated is None:  # decided at the first quantization, per sequence and per rank group
            rot, scl = torch.zeros(b, h, dtype=torch.bool), torch.zeros(b, h, dtype=torch.bool)
            for i in range(b):
                for g in range(w):
                    heads = slice(g * hg, (g + 1) * hg)
                    qg = None if q is None else q[i:i + 1, g * q.shape[1] // w:(g + 1) * q.shape[1] // w]
                    r, s = resolve_key_flags(k[i:i + 1, heads], cfg, qg)
                    rot[i, heads], scl[i, heads] = r, s
            self.key_rotated, self.key_scaled = rot.to(k.device), scl.to(k.device)
        parts = []
        for i in range(b):
            parts.append(torch.cat([
                fake_keys(k[i:i + 1, g * hg:(g + 1) * hg], cfg.bits, cfg.group_size,
                          self.key_rotated[i, g * hg:(g + 1) * hg], self.key_scaled[i, g * hg:(g + 1) * hg])
                for g in range(w)
            ], dim=1))
        self.view_k[:, :, start:stop] = torch.cat(parts)
        self.view_v[:, :, start:stop] = fake_values(v, cfg.bits, cfg.group_size, cfg.rotate_values)


def _make_cache(world_of: dict):
    inner = harness.make_cache

    def make_cache(method, model_config, prefill_kv=None, store_dtype=torch.bfloat16):
        cache = inner(method, model_config, None, store_dtype)
        w = world_of.get(method.name)
        if w is not None:
            cache.layers[:] = [RankGroupedLayer(method, w, store_dtype) for _ in cache.layers]
        if prefill_kv is not None:
            for layer, (k, v, *q) in zip(cache.layers, prefill_kv):
                layer.seed(k, v, q[0] if q and method.use_queries else None)
        return cache

    return make_cache


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "qwen2.5-0.5b"])
    p.add_argument("--world", type=int, default=None, help="TP ranks (default: one kv head per rank)")
    p.add_argument("--text", nargs="*", default=["pg", "wiki"], choices=["pg", "wiki"])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = assets.load_model(args.model, args.cache_dir, dtype=torch.float32)
    hkv = model.config.num_key_value_heads
    world = args.world or hkv
    if hkv % world:
        raise ValueError(f"--world {world} must divide the model's {hkv} kv heads")
    configs = {"default-2": OScaRConfig(), "paper-2": OScaRConfig.paper(), "KIVI+scaleK-2": OScaRConfig(
        rotate_keys=False, rotate_values=False, token_scaling=True)}
    methods, world_of = [KVMethod("bf16", "bf16")], {}
    for name, cfg in configs.items():
        methods.append(KVMethod(f"{name} global norm", "oscar", cfg, cfg.bits))
        methods.append(KVMethod(f"{name} per-rank norm (W={world})", "oscar", cfg, cfg.bits))
        world_of[methods[-1].name] = world
    harness.make_cache = _make_cache(world_of)
    for text in args.text:
        docs = assets.paul_graham_essays(args.cache_dir) if text == "pg" else assets.wiki_articles(args.cache_dir)
        windows = torch.stack(make_windows(tok, docs, args.context + CONTINUATION + 1, args.windows))
        t0 = time.perf_counter()
        nll = {m.name: 0.0 for m in methods}
        for i in range(0, len(windows), args.batch):
            ids = windows[i:i + args.batch]
            kv, _ = prefill(model, ids[:, :args.context])
            res = continuation_nll(model, ids, args.context, methods, CHUNK, kv)
            for name, r in res.items():
                nll[name] += float(r.nll.sum())
        n = len(windows) * CONTINUATION
        base = math.exp(nll["bf16"] / n)
        print(f"\n{args.model}, text {text}, C={args.context}, {len(windows)} windows, {hkv} kv heads, W={world} "
              f"({time.perf_counter() - t0:.0f}s)")
        print("| method | ppl | vs bf16 |\n|---|---|---|")
        for m in methods:
            ppl = math.exp(nll[m.name] / n)
            print(f"| {m.name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
