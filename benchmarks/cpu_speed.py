"""CPU prefill and decode: transformers' DynamicCache vs OScaRCache, same model, same run (ratios).

SmolLM2-135M's shape (hidden 576, 9 query / 3 kv heads, head_dim 64, MLP 1536; random weights, fp32),
``--layers`` of its 30 layers (default 4, to keep the run short: attention and cache work per layer is what
differs between the caches). Eager forwards (no torch.compile), ``torch.no_grad``, one thread by default.

    python benchmarks/cpu_speed.py --contexts 1024 4096 --decode 16

Prints seconds per prefill and decode tokens/s for each cache and the OScaR/DynamicCache ratios.
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from oscar_compile import OScaRConfig
from oscar_compile.hf_cache import OScaRCache, cache_kwarg_name, use_oscar_attention


def model_of(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=16384)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def measure(model, make_cache, context: int, decode: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) for one prompt of ``context`` tokens then ``decode`` greedy steps."""
    ids = torch.randint(0, 49152, (1, context), generator=torch.Generator().manual_seed(1))
    cache = make_cache(context + decode)
    name = cache_kwarg_name(model)
    t0 = time.perf_counter()
    out = model(ids, **{name: cache})
    prefill = time.perf_counter() - t0
    token = out.logits[:, -1:].argmax(-1)
    model(token, **{name: cache})  # first decode step: warm-up
    t0 = time.perf_counter()
    for _ in range(decode):
        token = model(token, **{name: cache}).logits[:, -1:].argmax(-1)
    return prefill, decode / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    plain, oscar = model_of(args.layers), model_of(args.layers)
    use_oscar_attention(oscar)
    config = OScaRConfig()
    rows = []
    for ctx in args.contexts:
        bf = measure(plain, lambda n: DynamicCache(), ctx, args.decode)
        oq = measure(oscar, lambda n: OScaRCache(oscar.config, n, config), ctx, args.decode)
        rows.append([ctx, f"{bf[0]:.2f}", f"{oq[0]:.2f}", f"{oq[0] / bf[0]:.2f}", f"{bf[1]:.1f}", f"{oq[1]:.1f}",
                     f"{oq[1] / bf[1]:.2f}"])  # fmt: skip
    print(f"torch {torch.__version__}, {args.layers} layers of SmolLM2-135M's shape, {args.threads} thread(s), fp32")
    print(tabulate(rows, headers=["context", "prefill s DynamicCache", "prefill s OScaR", "OScaR / Dynamic",
                                  "decode tok/s DynamicCache", "decode tok/s OScaR", "OScaR / Dynamic"]))  # fmt: skip


if __name__ == "__main__":
    main()
