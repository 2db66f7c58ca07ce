"""OScaR numerics in one screen: error of each 2-bit variant on synthetic keys/values, and cache bytes.

Run: python examples/numerics_demo.py
"""

import torch
import torch.nn.functional as F
from tabulate import tabulate

from oscar_compile import OScaRConfig, fake_quantize
from oscar_compile.kernels import CacheFormat, allocate_cache, cache_nbytes

VARIANTS = {
    "KIVI-2": OScaRConfig.kivi(),
    "rotate keys": OScaRConfig.kivi(rotate_keys=True),
    "rotate values": OScaRConfig.kivi(rotate_values=True),
    "scale keys": OScaRConfig.kivi(token_scaling=True),
    "OScaR-2 (paper)": OScaRConfig.paper(),
    "OScaR-4 (paper)": OScaRConfig.paper(bits=4),
}


def main():
    gen = torch.Generator().manual_seed(0)
    # keys with outlier channels and low-norm tokens the queries align with (attention-sink-like)
    k = torch.randn(1, 8, 1024, 64, generator=gen)
    k[..., :4] *= 4.0
    k[:, :, ::16] *= 0.05
    sink = k[:, :, ::16].mean(2, keepdim=True).repeat_interleave(2, 1)
    q = 0.3 * torch.randn(1, 16, 16, 64, generator=gen) + 16.0 * sink / sink.norm(dim=-1, keepdim=True)
    v = torch.randn(1, 8, 1024, 64, generator=gen)
    v[..., :4] *= 4.0
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    rows = []
    for name, cfg in VARIANTS.items():
        kh, vh = fake_quantize(k, v, cfg)
        out = F.scaled_dot_product_attention(q, kh, vh, enable_gqa=True)
        rows.append([name, f"{((kh - k).norm() / k.norm()):.3f}", f"{((out - ref).norm() / ref.norm()):.3f}"])
    print(tabulate(rows, headers=["variant", "key rel. error", "attention-output rel. error"]))

    # Llama-3.1-8B-shaped layer at 128K tokens: bf16 cache vs OScaR-2 storage (allocated on the meta device)
    fmt = CacheFormat(bits=2, group_size=32, residual_length=128, rotate_values=True)
    cache = allocate_cache(1, 8, 131072, 128, fmt, torch.bfloat16, device="meta")
    bf16 = 2 * 1 * 8 * 131072 * 128 * 2
    print(f"\nKV bytes per layer at 128K tokens: bf16 {bf16 / 2**20:.1f} MiB, "
          f"OScaR-2 {cache_nbytes(cache) / 2**20:.1f} MiB ({bf16 / cache_nbytes(cache):.2f}x smaller)")


if __name__ == "__main__":
    main()
