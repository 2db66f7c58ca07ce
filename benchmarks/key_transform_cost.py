"""Cost of the adaptive key transform (``choose_key_flags``) per layer, at the shapes of the eval models.

    python benchmarks/key_transform_cost.py [--tokens 1024 4096] [--reps 3] [--prefill-model smollm2-135m]

Prints the median time of one decision (one layer, batch 1) and the total over the model's layers; compare
with a full-precision prefill of the same length (printed by benchmarks/accuracy.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from oscar_compile.kernels.key_transform import NUM_QUERIES, choose_key_flags

# name: (layers, q heads, kv heads, head_dim)
SHAPES = {"smollm2-135m": (30, 9, 3, 64), "qwen2.5-0.5b": (24, 14, 2, 64), "llama-3.1-8b": (32, 32, 8, 128)}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="*", default=[1024, 4096])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prefill-model", default=None, help="also time a full-precision prefill of this model (assets name)")
    args = p.parse_args(argv)
    if args.prefill_model:
        from oscar_compile import assets
        from oscar_compile.eval import prefill

        model, _ = assets.load_model(args.prefill_model)
        for t in args.tokens:
            ids = torch.randint(0, 1000, (1, t))
            prefill(model, ids[:, :128])  # warm-up
            t0 = time.perf_counter()
            prefill(model, ids)
            print(f"{args.prefill_model}: full-precision prefill of {t} tokens {1000 * (time.perf_counter() - t0):.0f} ms")
    print(f"torch threads {torch.get_num_threads()}")
    print("| model | prompt tokens | one layer (ms) | all layers (ms) |\n|---|---|---|---|")
    for name, (layers, hq, hkv, d) in SHAPES.items():
        for t in args.tokens:
            keys = torch.randn(1, hkv, t, d).to(torch.bfloat16)
            queries = torch.randn(1, hq, NUM_QUERIES, d).to(torch.bfloat16)
            choose_key_flags(keys, 2, 32, queries=queries, scale=True)  # warm-up
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                choose_key_flags(keys, 2, 32, queries=queries, scale=True)
                times.append(time.perf_counter() - t0)
            ms = 1000 * statistics.median(times)
            print(f"| {name} | {t} | {ms:.1f} | {ms * layers:.0f} |", flush=True)


if __name__ == "__main__":
    main()
