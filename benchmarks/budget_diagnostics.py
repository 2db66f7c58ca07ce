"""Diagnostics for the bits budget (issue 14): what limits it, and variants tried against it.

    python benchmarks/budget_diagnostics.py --model qwen2.5-0.5b --windows 2 \
        --damage /tmp/i14/res/damage_qwen2.5-0.5b_C1024_pg.json \
        --methods budget-2.5,oracle-2.5,budget-3,oracle-3,K4V2,K2V4

Same harness as ``accuracy.py`` (fake quantization with the cache's numerics, decode path, 128 scored
tokens per window after a full-precision prefill, the same windows). Each method reports the perplexity
change and the mean KL divergence of the next-token distribution from the bf16 cache's (lower variance).

Method names:

* ``auto-2`` / ``auto-4`` / ``budget-B``: as in ``accuracy.py`` (``OScaRConfig(bits=...)``);
* ``oracle-B``: the budget's number of 4-bit layers given to the layers with the largest **measured**
  damage (``--damage``: an ``accuracy.py --layer-damage`` JSON; only that layer at 2 bits, KL from bf16):
  the best any per-layer allocation can choose if damage adds up;
* ``K4V2`` / ``K2V4``: keys at 4 bits and values at 2 (or the reverse) in every layer (3.0 code bits);
* ``kfirst-B``: budget ``B`` spent on keys first: ``floor(2 L (B - 2) / 2)`` key-or-value slots at 4 bits,
  keys of the layers ranked most damaged by the default predictor first (``L`` keys then values);
* ``slot-B``: the same slots, given to the largest of every layer's key-only and value-only predicted damage
  (:func:`kv_damage`, one ranking over both);
* a suffix ``+sinkS``: the first ``S`` positions kept at full precision (attention sinks).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import accuracy  # noqa: E402  (benchmarks/ on sys.path when run as a script)
from oscar_compile import OScaRConfig, assets
from oscar_compile.bit_budget import combine_ranks, layer_scores, num_four_bit
from oscar_compile.eval import KVMethod, continuation_nll, make_windows, prefill
from oscar_compile.eval import caches as _caches
from oscar_compile.eval import harness as _harness

CONTINUATION, CHUNK = accuracy.CONTINUATION, accuracy.CHUNK

# ---- per-layer key/value bits in the fake-quant harness (diagnostic only) --------------------------------
# KV_BITS[method name] -> callable(seq, layer_index) -> (key bits, value bits); None: the layer's own bits.
KV_BITS: dict = {}
_orig_quantize_blocks = _caches.FakeQuantLayer._quantize_blocks


def _quantize_blocks(self, start, stop):
    rule = KV_BITS.get(self.method.name)
    if rule is None or self.method.kind != "oscar":
        return _orig_quantize_blocks(self, start, stop)
    s = self.method.sink_tokens
    k, v = self.hist_k[:, :, start:stop], self.hist_v[:, :, start:stop]
    b, h = k.shape[:2]
    cfg = self.config
    kv_bits = [rule(i, self.layer_index) for i in range(b)]
    if self.key_rotated is None:
        from oscar_compile.fake_quant import resolve_key_flags

        q = self.prompt_queries
        flags = [resolve_key_flags(k[i:i + 1], cfg.replace(bits=kv_bits[i][0], layer_bits=None),
                                   None if q is None else q[i:i + 1]) for i in range(b)]
        as_t = lambda f: f if isinstance(f, torch.Tensor) else torch.full((h,), f, dtype=torch.bool)  # noqa: E731
        self.key_rotated = torch.stack([as_t(r) for r, _ in flags]).to(k.device)
        self.key_scaled = torch.stack([as_t(c) for _, c in flags]).to(k.device)
    k_hat = torch.cat([_caches.fake_keys(k[i:i + 1], kv_bits[i][0], cfg.group_size, self.key_rotated[i],
                                         self.key_scaled[i]) for i in range(b)])
    v_hat = torch.cat([_caches.fake_values(v[i:i + 1], kv_bits[i][1], cfg.group_size, cfg.rotate_values)
                       for i in range(b)])
    if start < s:
        k_hat[:, :, : s - start] = k[:, :, : s - start]
        v_hat[:, :, : s - start] = v[:, :, : s - start]
    self.view_k[:, :, start:stop] = k_hat
    self.view_v[:, :, start:stop] = v_hat


_caches.FakeQuantLayer._quantize_blocks = _quantize_blocks
_orig_make_cache = _harness.make_cache


def _make_cache(method, model_config, prefill_kv=None, *a, **kw):
    cache = _orig_make_cache(method, model_config, prefill_kv, *a, **kw)
    for i, layer in enumerate(getattr(cache, "layers", [])):
        layer.layer_index = i
    return cache


_harness.make_cache = _make_cache


def kfirst_rule(prompt_kv_per_seq, budget: float):
    """Per sequence: per layer (key bits, value bits); slots ranked keys first by the default predictor."""
    out = []
    for kv in prompt_kv_per_seq:
        n = len(kv)
        scores = combine_ranks([layer_scores(k, v, q, OScaRConfig()) for k, v, q in kv])
        order = sorted(range(n), key=lambda i: (-scores[i], i))
        slots = num_four_bit(budget, 2 * n)  # 4-bit key-or-value slots the budget pays for
        kb = {i: 4 if r < slots else 2 for r, i in enumerate(order)}
        vb = {i: 4 if n + r < slots else 2 for r, i in enumerate(order)}
        out.append([(kb[i], vb[i]) for i in range(n)])
    return out


@torch.no_grad()
def kv_damage(keys, values, queries, config: OScaRConfig, bits: int = 2) -> tuple[float, float]:
    """``layer_damage``'s relative-value measure with only the keys (first) or only the values (second)
    quantized at ``bits``: the two halves of a layer's predicted damage, in the same units."""
    from oscar_compile.bit_budget import MAX_TOKENS, NUM_QUERIES
    from oscar_compile.fake_quant import resolve_key_flags
    from oscar_compile.kernels.quantization import dequantize_keys, dequantize_values, quantize_keys, quantize_values

    h, d = keys.shape[1], keys.shape[3]
    g = config.group_size
    n = min(keys.shape[2], MAX_TOKENS) // g * g
    cfg = config.replace(bits=bits, layer_bits=None)
    k, v = keys[:, :, :n].float(), values[:, :, :n].float()
    q = queries[:, :, -NUM_QUERIES:].float()
    rotate, scale = resolve_key_flags(k, cfg, queries)
    k_hat = dequantize_keys(quantize_keys(k, bits, g, rotate, scale), torch.float32)
    v_hat = dequantize_values(quantize_values(v, bits, g, cfg.rotate_values), torch.float32)
    rep = q.shape[1] // h

    def attend(kk, vv):
        kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
        return torch.softmax(q @ kk.transpose(-1, -2) * d ** -0.5, dim=-1) @ vv

    ref = attend(k, v)
    norm = ref.square().sum().clamp_min(1e-30) / v.square().mean()
    return float((attend(k_hat, v) - ref).square().sum() / norm), float((attend(k, v_hat) - ref).square().sum() / norm)


def slot_rule(prompt_kv_per_seq, budget: float):
    """Per sequence: per layer (key bits, value bits); the key and value halves of every layer ranked together
    by :func:`kv_damage`, the budget's 4-bit slots to the largest."""
    out = []
    for kv in prompt_kv_per_seq:
        n = len(kv)
        dmg = [kv_damage(k, v, q, OScaRConfig()) for k, v, q in kv]
        slots = sorted([(-dmg[i][0], i, 0) for i in range(n)] + [(-dmg[i][1], i, 1) for i in range(n)])
        high = {(i, j) for _, i, j in slots[:num_four_bit(budget, 2 * n)]}
        out.append([(4 if (i, 0) in high else 2, 4 if (i, 1) in high else 2) for i in range(n)])
    return out


def build_methods(names, n_layers, damage):
    methods = [KVMethod("bf16", "bf16")]
    for name in names:
        base, _, sink = name.partition("+sink")
        sink = int(sink) if sink else 0
        if base in ("auto-2", "auto-4"):
            cfg = OScaRConfig(bits=int(base[-1]))
        elif base.startswith("budget-"):
            cfg = OScaRConfig(bits=float(base.split("-")[1]))
        elif base.startswith("oracle-"):
            b = float(base.split("-")[1])
            kl = damage["measured_kl"]
            n4 = num_four_bit(b, n_layers)
            top = set(sorted(range(n_layers), key=lambda i: -kl[i])[:n4])
            cfg = OScaRConfig(bits=b, layer_bits=tuple(4 if i in top else 2 for i in range(n_layers)))
        elif base in ("K4V2", "K2V4"):
            kb, vb = int(base[1]), int(base[3])
            cfg = OScaRConfig(bits=kb)
            KV_BITS[name] = lambda seq, layer, kb=kb, vb=vb: (kb, vb)
        elif base.startswith(("kfirst-", "slot-")):
            cfg = OScaRConfig(bits=2)
            KV_BITS[name] = None  # filled per run from the prompts (see main)
        else:
            raise SystemExit(f"unknown method {name}")
        methods.append(KVMethod(name, "oscar", cfg, 2, sink_tokens=sink))
    return methods


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(assets.MODELS))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text", default="pg", choices=["pg", "wiki"])
    p.add_argument("--methods", required=True)
    p.add_argument("--damage", type=Path, default=None, help="accuracy.py --layer-damage JSON (oracle rows)")
    p.add_argument("--out", type=Path, required=True, help="JSON file (rows merged by method name)")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    names = args.methods.split(",")
    damage = json.loads(args.damage.read_text()) if args.damage else None
    model, tok = assets.load_model(args.model, args.cache_dir)
    n_layers = model.config.num_hidden_layers
    methods = build_methods(names, n_layers, damage)
    docs = accuracy._corpus(args.text, args.cache_dir)
    windows = torch.stack(make_windows(tok, docs, args.context + CONTINUATION + 1, args.windows))
    t0 = time.perf_counter()
    nll = {m.name: [] for m in methods}
    kl = {m.name: [] for m in methods}
    for s in range(0, len(windows), args.batch):
        ids = windows[s:s + args.batch]
        kv, _ = prefill(model, ids[:, :args.context])
        for m in methods:
            if m.name.startswith(("kfirst-", "slot-")):
                b = float(m.name.split("+")[0].split("-")[1])
                per_seq = [[tuple(None if x is None else x[i:i + 1] for x in e) for e in kv] for i in range(len(ids))]
                table = (kfirst_rule if m.name.startswith("kfirst-") else slot_rule)(per_seq, b)
                KV_BITS[m.name] = lambda seq, layer, table=table: table[seq][layer]
                print(f"  {m.name}: keys 4-bit {[sum(k == 4 for k, _ in t) for t in table]}, "
                      f"values 4-bit {[sum(v == 4 for _, v in t) for t in table]}", flush=True)
        res = continuation_nll(model, ids, args.context, methods, CHUNK, kv)
        for m in methods:
            nll[m.name] += res[m.name].nll.tolist()
            kl[m.name] += [0.0] * len(ids) if res[m.name].kl is None else res[m.name].kl.tolist()
        print(f"  windows {s}..{s + len(ids) - 1} done ({time.perf_counter() - t0:.0f}s)", flush=True)
    tokens = len(windows) * CONTINUATION
    base = math.exp(sum(nll["bf16"]) / tokens)
    rows = {}
    for m in methods:
        ppl = math.exp(sum(nll[m.name]) / tokens)
        rows[m.name] = dict(ppl=ppl, delta_pct=100 * (ppl / base - 1), kl_mean=sum(kl[m.name]) / tokens,
                            window_nll=nll[m.name], window_kl=kl[m.name])
        print(f"{m.name:>18}  ppl {ppl:8.3f}  {rows[m.name]['delta_pct']:+7.2f}%  KL x1e3 "
              f"{1e3 * rows[m.name]['kl_mean']:.2f}", flush=True)
    meta = dict(model=args.model, context=args.context, windows=len(windows), text=args.text,
                seconds=time.perf_counter() - t0, torch_threads=torch.get_num_threads())
    if args.out.exists():
        old = json.loads(args.out.read_text())
        if old["meta"]["windows"] == meta["windows"] and old["meta"]["text"] == meta["text"]:
            rows = old["rows"] | rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
