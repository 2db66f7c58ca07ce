"""GPU check of the graph pass on a hand-written decoder and of oscar.compile on a transformers model.

Run on the device machine (after installing the package): ``python benchmarks/gpu_pass_check.py``.
Prints one line per check and a table last; exits non-zero if a check fails. Without CUDA it runs the same
checks on CPU at small sizes (a smoke test of the script; no timings).

1. A gpt-fast-style decoder (bf16, 8 q / 2 kv heads, D=128, static [B, Hkv, S, D] buffers, causal mask
   buffer indexed by the positions, SDPA) through ``oscar.compile`` with the default mode and with
   ``mode="reduce-overhead"`` (CUDA graphs): every step's output against the ``fake_quantize`` reference
   (attend-then-append), the cache buffers replaced by OScaR halves, decode step time (CUDA events).
2. A tiny Llama through ``oscar.compile``: ``generate`` twice with lengths that size different caches,
   then a second compiled model in the same process; the report must list the rewritten sites.
"""

from __future__ import annotations

import copy
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import oscar_compile as oscar
from oscar_compile import OScaRConfig, fake_quantize
from oscar_compile.kv_tensor import is_oscar_cache

RESULTS: list[tuple[str, str, str]] = []


class Layer(nn.Module):
    def __init__(self, dim, heads, kv_heads, max_len, batch, dtype):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.wkv = nn.Linear(dim, 2 * kv_heads * self.d, bias=False, dtype=dtype)
        self.wo = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.register_buffer("k_cache", torch.zeros(batch, kv_heads, max_len, self.d, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(batch, kv_heads, max_len, self.d, dtype=dtype))

    def forward(self, x, mask, pos):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.heads, self.d).transpose(1, 2)
        k, v = self.wkv(x).view(b, t, 2, self.kv_heads, self.d).permute(2, 0, 3, 1, 4)
        self.k_cache[:, :, pos] = k
        self.v_cache[:, :, pos] = v
        rep = self.heads // self.kv_heads
        keys = self.k_cache.repeat_interleave(rep, dim=1)
        values = self.v_cache.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class Decoder(nn.Module):
    def __init__(self, n_layers=2, dim=1024, heads=8, kv_heads=2, max_len=1024, batch=2, dtype=torch.bfloat16,
                 window=None):  # fmt: skip
        super().__init__()
        self.layers = nn.ModuleList(Layer(dim, heads, kv_heads, max_len, batch, dtype) for _ in range(n_layers))
        causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))
        if window is not None:  # sliding window: key j visible from query i iff i - window < j <= i
            causal &= torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), diagonal=1 - window)
        self.register_buffer("causal", causal)

    def forward(self, x, pos):
        mask = self.causal[None, None, pos]
        for layer in self.layers:
            x = x + layer(x, mask, pos)
        return x


@torch.no_grad()
def reference(model, steps, config):
    """Eager run where each cache holds fake_quantize(history) before every step (attend-then-append)."""
    hist = {id(l): (torch.zeros_like(l.k_cache), torch.zeros_like(l.v_cache)) for l in model.layers}
    outs, stored = [], 0
    for x, pos in steps:
        for layer in model.layers:
            hk, hv = hist[id(layer)]
            kq, vq = fake_quantize(hk[:, :, :stored], hv[:, :, :stored], config)
            layer.k_cache[:, :, :stored] = kq
            layer.v_cache[:, :, :stored] = vq
        outs.append(model(x, pos))
        for layer in model.layers:
            hk, hv = hist[id(layer)]
            hk[:, :, pos] = layer.k_cache[:, :, pos]
            hv[:, :, pos] = layer.v_cache[:, :, pos]
        stored = int(pos[-1]) + 1
    return outs


def check_decoder(mode, window=None):
    name = f"decoder mode={mode or 'default'}" + (f" window={window}" if window else "")
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dim, max_len, prompt, decode = (1024, 1024, 300, 24) if cuda else (256, 256, 140, 3)
    config = OScaRConfig.paper()
    model = Decoder(dim=dim, max_len=max_len, window=window).to(dev).eval()
    ref_model = copy.deepcopy(model)
    g = torch.Generator(device=dev).manual_seed(1)
    steps = [(torch.randn(2, prompt, dim, device=dev, dtype=torch.bfloat16, generator=g), torch.arange(prompt, device=dev))]
    for i in range(decode):
        x = torch.randn(2, 1, dim, device=dev, dtype=torch.bfloat16, generator=g)
        steps.append((x, torch.arange(prompt + i, prompt + i + 1, device=dev)))
    oscar.compile(model, config, fullgraph=True, mode=mode if cuda else None)
    start = time.perf_counter()
    outs, times = [], []
    with torch.no_grad():
        for i, (x, pos) in enumerate(steps):
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            out = model(x, pos)
            if cuda:
                e1.record()
                torch.cuda.synchronize()
                if i >= 8:
                    times.append(e0.elapsed_time(e1))
            outs.append(out.clone())
    wall = time.perf_counter() - start
    refs = reference(ref_model, steps, config)
    err = max((o.float() - r.float()).abs().max().item() for o, r in zip(outs, refs))
    scale = max(r.float().abs().max().item() for r in refs)
    held = all(is_oscar_cache(l.k_cache) and is_oscar_cache(l.v_cache) for l in model.layers)
    ok = held and err <= 0.02 * scale and model.oscar_report.rewritten == 2
    ok = ok and (window is None or f"window {window}" in str(model.oscar_report))  # the window is carried
    step_ms = sorted(times)[len(times) // 2] if times else float("nan")
    RESULTS.append((name, "ok" if ok else "FAIL", f"max err {err:.4g} (scale {scale:.3g}), halves in module {held}, "
                    f"decode step {step_ms:.3f} ms (median, events), first {len(steps)} steps {wall:.1f} s"))  # fmt: skip
    print(name, RESULTS[-1][1:], flush=True)
    print(model.oscar_report, flush=True)


def check_hf():
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()
    ids = torch.randint(0, 256, (1, 150), device=dev)
    tokens = []
    try:
        for k in range(2):
            model = copy.deepcopy(base)
            oscar.compile(model)
            runs = [model.generate(ids, max_new_tokens=n, do_sample=False) for n in (20, 200)]
            tokens.append(runs)
            rewritten = model.oscar_report.rewritten
            print(model.oscar_report, flush=True)
            ok = rewritten > 0 and runs[1].shape[1] == 350
            RESULTS.append((f"hf generate x2, model {k + 1}", "ok" if ok else "FAIL", f"{rewritten} site(s) rewritten"))
        same = all(torch.equal(a, b) for a, b in zip(tokens[0], tokens[1]))
        RESULTS.append(("hf second model same tokens", "ok" if same else "FAIL", ""))
    except Exception as e:  # report it as a failed check, keep going
        RESULTS.append(("hf generate", "FAIL", f"{type(e).__name__}: {str(e)[:300]}"))


def main():
    print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", flush=True)
    for mode, window in ((None, None), ("reduce-overhead", None), ("reduce-overhead", 100)):
        try:
            check_decoder(mode, window)
        except Exception as e:
            RESULTS.append((f"decoder mode={mode} window={window}", "FAIL", f"{type(e).__name__}: {str(e)[:300]}"))
    check_hf()
    from tabulate import tabulate

    print(tabulate(RESULTS, headers=["check", "result", "detail"]))
    sys.exit(0 if all(r == "ok" for _, r, _ in RESULTS) else 1)


if __name__ == "__main__":
    main()
