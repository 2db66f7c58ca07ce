"""Accuracy of KV-cache methods on real trained models (issue 6): continuation perplexity through the
decode path, passkey retrieval, per-layer attention-output error; a Markdown table and a plot.

    python benchmarks/accuracy.py --model smollm2-135m --contexts 1024 4096 --passkey 2048 4096 7936
    python benchmarks/accuracy.py --model smollm2-135m --text wiki --contexts 1024     # Wikipedia windows
    python benchmarks/accuracy.py --model smollm2-135m --sliding 512 6 --contexts 2048 # Gemma-3-style layers
    python benchmarks/accuracy.py --model smollm2-135m --layer-damage --windows 2      # budget predictor check

Results go to ``--out`` (default ``results/``): one JSON per (model, context) and per passkey run, then
``accuracy.md`` and ``accuracy.png`` rebuilt from every JSON there (so runs can be split and resumed).
CPU-friendly: each window's prefill runs once and is shared by every method; windows run as a batch.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from oscar_compile import OScaRConfig, assets
from oscar_compile.bit_budget import layer_damage
from oscar_compile.eval import (
    KVMethod,
    attention_rel_errors,
    bits_per_element,
    continuation_nll,
    make_windows,
    passkey,
    prefill,
    standard_methods,
)

CONTINUATION = 128
CHUNK = 16


def _corpus(name: str, cache):
    return assets.paul_graham_essays(cache) if name == "pg" else assets.wiki_articles(cache)


def sliding_variant(model, window: int, period: int):
    """The same weights as a Gemma-3-style model: every ``period``-th layer full attention, the others
    sliding-window attention over ``window`` tokens (transformers' Qwen2 architecture, which takes
    ``layer_types``; a Llama checkpoint maps onto it with zero q/k/v biases). No package ships a trained
    sliding-window model small enough here, so this is what the sliding-window rows measure."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = model.config
    n = c.num_hidden_layers
    types = ["full_attention" if i % period == period - 1 else "sliding_attention" for i in range(n)]
    cfg = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=n, num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, rope_parameters=dict(c.rope_parameters),
        use_sliding_window=True, sliding_window=window, layer_types=types,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )  # fmt: skip
    if model.model.layers[0].self_attn.q_proj.bias is not None:
        raise ValueError("sliding_variant maps a Llama checkpoint (no q/k/v biases) onto Qwen2")
    out = Qwen2ForCausalLM(cfg).to(model.dtype)
    state = model.state_dict()
    missing, unexpected = out.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in missing):
        raise ValueError(f"sliding_variant: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for layer in out.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias.data.zero_()
    out.config._attn_implementation = model.config._attn_implementation
    return out.eval()


def sliding_bytes(model, length: int, config: OScaRConfig) -> dict:
    """Bytes the real OScaRCache holds for one sequence of ``length`` positions (bf16 model), with sliding
    layers quantized (whole history) and kept in transformers' window-sized bf16 layer (the default)."""
    from oscar_compile.hf_cache import OScaRCache, _head_dim

    text = model.config
    out = {}
    for name, qs in (("quantized", True), ("kept", False)):
        cache = OScaRCache(text, length, config, quantize_sliding=qs)
        cache.early_initialization(1, text.num_key_value_heads, _head_dim(text), torch.bfloat16, "cpu")
        rep = cache.memory_report()
        out[name] = dict(oscar_bytes=rep["oscar_bytes"], static_cache_bytes=rep["static_cache_bytes"])
    return out


def _save_rows(path: Path, meta: dict, rows: list[dict]) -> None:
    """Merge ``rows`` into ``path`` (same model/context/windows/text): reruns replace a method's row."""
    if path.exists():
        old = json.loads(path.read_text())
        if all(old["meta"][k] == meta[k] for k in ("windows", "text", "continuation")):
            merged = {r["method"]: r for r in old["rows"]} | {r["method"]: r for r in rows}
            order = [r["method"] for r in old["rows"]] + [r["method"] for r in rows]
            rows = [merged[n] for n in dict.fromkeys(order)]
            meta = meta | {"prefill_s": old["meta"]["prefill_s"] + meta["prefill_s"],
                           "methods_s": old["meta"]["methods_s"] + meta["methods_s"]}
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


def run_perplexity(model, tok, model_name, context, args, methods, out: Path) -> None:
    """Prefill every window once (kept in memory), then run the methods one by one, saving after each."""
    docs = _corpus(args.text, args.cache_dir)
    windows = torch.stack(make_windows(tok, docs, context + CONTINUATION + 1, args.windows))
    cfg = model.config
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    path = out / f"ppl_{model_name}_C{context}{'' if args.text == 'pg' else '_' + args.text}.json"
    from oscar_compile.eval.caches import make_cache

    n_quant = {m.name: len(make_cache(m, cfg).quantized) for m in methods if m.kind == "oscar"}
    done = set()
    if args.resume and path.exists():
        done = {r["method"] for r in json.loads(path.read_text())["rows"]}
    todo = [m for m in methods if m.name not in done or m.name == "bf16"]
    batches = [windows[i:i + args.batch] for i in range(0, len(windows), args.batch)]
    t0 = time.perf_counter()
    kvs = [prefill(model, ids[:, :context])[0] for ids in tqdm(batches, desc=f"prefill C={context}")]
    t_prefill = time.perf_counter() - t0
    ref = None
    meta = dict(model=model_name, context=context, windows=len(windows), continuation=CONTINUATION,
                chunk=CHUNK, text=args.text, prefill_s=t_prefill, methods_s=0.0,
                torch_threads=torch.get_num_threads())
    print(f"{model_name} C={context}: prefill {t_prefill:.0f}s", flush=True)
    base = None
    for m in tqdm(todo, desc=f"{model_name} C={context}", unit="method"):
        t1 = time.perf_counter()
        res = [continuation_nll(model, ids, context, [m], CHUNK, kv)[m.name] for ids, kv in zip(batches, kvs)]
        secs = time.perf_counter() - t1
        if m.name == "bf16":
            ref = res
            base = math.exp(torch.cat([r.nll for r in res]).sum().item() / (len(windows) * CONTINUATION))
        nll = torch.cat([r.nll for r in res])
        err = (sum(torch.tensor(attention_rel_errors(r, b)) * r.nll.numel() for r, b in zip(res, ref))
               / len(windows)).tolist()
        ppl = math.exp(nll.sum().item() / (len(windows) * CONTINUATION))
        row = dict(method=m.name, bits=bits_per_element(m, kv_heads, head_dim, n_quant.get(m.name)), ppl=ppl,
                   delta_pct=100 * (ppl / base - 1), attn_err_mean=sum(err) / len(err), attn_err_max=max(err),
                   attn_err_per_layer=err, window_nll=nll.tolist(), seconds=secs)
        if m.kind == "oscar" and m.config.is_budget:  # the allocation each window got (first batch's rows)
            from oscar_compile.eval.caches import make_cache as _mk

            row["layer_bits"] = [list(_mk(m, cfg, kv).layer_bits()) for kv in kvs]
        _save_rows(path, meta | {"methods_s": secs, "prefill_s": t_prefill if m.name == "bf16" else 0.0}, [row])
        report(out)
        print(f"  {m.name:>16}  ppl {ppl:8.3f}  {row['delta_pct']:+7.2f}%  attn err {row['attn_err_mean']:.4f}"
              f"  ({secs:.0f}s)", flush=True)


def _spearman(a, b) -> float:
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def run_layer_damage(model, tok, model_name, context, args, out: Path) -> None:
    """Measured per-layer damage (perplexity increase with only that layer at 2 bits, the default key rule)
    against the budget's predictors computed from the same windows' prompts; Spearman rank correlations."""
    from oscar_compile.kernels.key_transform import key_transform_errors

    docs = _corpus(args.text, args.cache_dir)
    windows = torch.stack(make_windows(tok, docs, context + CONTINUATION + 1, args.windows))
    n_layers = model.config.num_hidden_layers
    methods = [KVMethod("bf16", "bf16")] + [KVMethod(f"only-{i}", "oscar", OScaRConfig(), 2, only_layers=(i,))
                                             for i in range(n_layers)]
    t0 = time.perf_counter()
    kv, _ = prefill(model, windows[:, :context])
    cfg2 = OScaRConfig()
    pred = {"abs_output": [], "rel_output": [], "rel_x_value": [], "value_ms": [], "key_logit": []}
    for k, v, q in kv:
        pred["abs_output"].append(sum(layer_damage(k[i:i + 1], v[i:i + 1], q[i:i + 1], cfg2, measure="output")
                                      for i in range(len(k))))
        pred["rel_output"].append(sum(layer_damage(k[i:i + 1], v[i:i + 1], q[i:i + 1], cfg2, measure="relative")
                                      for i in range(len(k))))
        pred["rel_x_value"].append(sum(layer_damage(k[i:i + 1], v[i:i + 1], q[i:i + 1], cfg2, measure="relative_value")
                                       for i in range(len(k))))
        pred["value_ms"].append(float(v.float().square().mean()))
        pred["key_logit"].append(sum(float(key_transform_errors(k[i:i + 1], 2, 32, q[i:i + 1]).min(0).values.sum())
                                     for i in range(len(k))))
    from oscar_compile.bit_budget import combine_ranks

    pred["rank_sum (default)"] = combine_ranks(list(zip(pred["rel_x_value"], pred["key_logit"])))
    res = continuation_nll(model, windows, context, methods, CHUNK, kv)
    tokens = len(windows) * CONTINUATION
    base = res["bf16"].nll.sum().item()
    measured = [100 * (math.exp((res[f"only-{i}"].nll.sum().item() - base) / tokens) - 1) for i in range(n_layers)]
    kl = [res[f"only-{i}"].kl.sum().item() / tokens for i in range(n_layers)]  # mean KL(bf16 || method) per token
    corr = {name: _spearman(p, kl) for name, p in pred.items()}
    corr_ppl = {name: _spearman(p, measured) for name, p in pred.items()}
    data = dict(meta=dict(model=model_name, context=context, windows=len(windows), text=args.text,
                          seconds=time.perf_counter() - t0), measured_pct=measured, measured_kl=kl, predictors=pred,
                spearman_kl=corr, spearman_ppl=corr_ppl, spearman_ppl_vs_kl=_spearman(measured, kl))
    (out / f"damage_{model_name}_C{context}_{args.text}.json").write_text(json.dumps(data, indent=1))
    print(f"layer damage {model_name} C={context} ({data['meta']['seconds']:.0f}s): spearman vs KL "
          + ", ".join(f"{k} {v:+.3f}" for k, v in corr.items()) + "; vs ppl "
          + ", ".join(f"{k} {v:+.3f}" for k, v in corr_ppl.items()), flush=True)
    print("  measured KL x1e3: " + " ".join(f"{1e3 * x:.2f}" for x in kl), flush=True)
    print("  measured ppl %: " + " ".join(f"{x:.2f}" for x in measured), flush=True)


def run_passkey(model, tok, model_name, context, args, methods, out: Path) -> None:
    hay = "\n\n".join(assets.paul_graham_essays(args.cache_dir))
    t0 = time.perf_counter()
    found = {m.name: [] for m in methods}
    for trial in tqdm(range(args.passkey_trials), desc=f"passkey {model_name} {context}"):
        res = passkey(model, tok, hay, context, args.depths, methods, seed=trial)
        for k, v in res.items():
            found[k] += v
    meta = dict(model=model_name, context=context, depths=args.depths, trials=args.passkey_trials,
                seconds=time.perf_counter() - t0)
    (out / f"passkey_{model_name}_C{context}.json").write_text(json.dumps(dict(meta=meta, found=found), indent=1))
    print(f"passkey {model_name} C={context} ({meta['seconds']:.0f}s): "
          + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in found.items()), flush=True)


def _label(col) -> str:
    model, context, text = col
    return f"{model} C={context}" + ("" if text == "pg" else f" {text}")


def report(out: Path) -> str:
    """Rebuild ``accuracy.md`` and ``accuracy.png`` from every JSON in ``out``; return the Markdown."""
    ppl = [json.loads(p.read_text()) for p in sorted(out.glob("ppl_*.json"))]
    pk = [json.loads(p.read_text()) for p in sorted(out.glob("passkey_*.json"))]
    if not ppl:
        return ""
    cols = [(d["meta"]["model"], d["meta"]["context"], d["meta"].get("text", "pg")) for d in ppl]
    present = {r["method"] for d in ppl for r in d["rows"]}
    order = [m.name for m in standard_methods() if m.name in present]
    order += sorted(present - set(order))
    by = {(d["meta"]["model"], d["meta"]["context"], d["meta"].get("text", "pg")): {r["method"]: r for r in d["rows"]}
          for d in ppl}
    bits = {r["method"]: r["bits"] for d in ppl for r in d["rows"]}
    lines = ["Continuation perplexity: increase over the bf16 cache (bf16 row: perplexity); "
             "attention-output relative error (mean over layers) in brackets.", "",
             "| method | bits/elt | " + " | ".join(_label(col) for col in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name in order:
        cells = []
        for col in cols:
            r = by[col].get(name)
            if r is None:
                cells.append("-")
            elif name == "bf16":
                cells.append(f"ppl {r['ppl']:.3f}")
            else:
                cells.append(f"{r['delta_pct']:+.2f}% ({r['attn_err_mean']:.3f})")
        lines.append(f"| {name} | {bits[name]:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Runs: " + "; ".join(
        f"{d['meta']['model']} C={d['meta']['context']}: {d['meta']['windows']} windows x "
        f"{d['meta']['continuation']} tokens ({d['meta']['text']}), prefill {d['meta']['prefill_s']:.0f} s, "
        f"methods {d['meta']['methods_s']:.0f} s" for d in ppl)]
    if pk:
        pk_names = list(dict.fromkeys(n for d in pk for n in d["found"]))
        pcols = [(d["meta"]["model"], d["meta"]["context"]) for d in pk]
        lines += ["", "Passkey retrieval (found / trials x depths "
                  + f"{pk[0]['meta']['depths']}):", "",
                  "| method | " + " | ".join(f"{m} {c}" for m, c in pcols) + " |",
                  "|---|" + "---|" * len(pcols)]
        for name in pk_names:
            lines.append(f"| {name} | " + " | ".join(
                f"{sum(d['found'][name])}/{len(d['found'][name])}" if name in d["found"] else "-" for d in pk) + " |")
    md = "\n".join(lines) + "\n"
    (out / "accuracy.md").write_text(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        named = {"KIVI-2", "OScaR-paper-2", "auto-2", "quanto-2", "KIVI-4", "OScaR-paper-4", "auto-4", "quanto-4"}
        markers = "osD^v<>"
        for j, col in enumerate(cols):
            rows = [r for name, r in by[col].items() if name != "bf16"]
            ax.scatter([r["bits"] for r in rows], [r["delta_pct"] for r in rows], marker=markers[j % len(markers)],
                       label=_label(col), alpha=0.8)
            for r in rows:
                if r["method"] in named:
                    ax.annotate(r["method"], (r["bits"], r["delta_pct"]), fontsize=6, alpha=0.8,
                                xytext=(4, 0), textcoords="offset points")
        ax.set_xlabel("stored bits per K/V element")
        ax.set_ylabel("perplexity increase over bf16 cache (%)")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title("2-bit rows at ~3 bits: unlabeled dots are single switches / pairs", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=120)
        plt.close(fig)
        pareto(by, cols, out / "pareto.png", plt)
    except ImportError as e:  # matplotlib is in the `eval` extra
        print(f"no plot: {e}")
    return md


PARETO = {  # family -> rows, in bits order
    "KIVI": ["KIVI-2", "KIVI-4"],
    "paper OScaR": ["OScaR-paper-2", "OScaR-paper-4"],
    "default (auto) + budgets": ["auto-2", "budget-2.25", "budget-2.5", "budget-3", "auto-4"],
}


def pareto(by, cols, path: Path, plt) -> None:
    """Perplexity increase vs stored bits per element, one panel per column, one line per family."""
    cols = [c for c in cols if "-sw" not in c[0] and any(n in by[c] for rows in PARETO.values() for n in rows)]
    if not cols:
        return
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 4), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for (family, names), marker, color in zip(PARETO.items(), "sDo", ("C0", "C1", "C2")):
            rows = sorted((by[col][n] for n in names if n in by[col]), key=lambda r: r["bits"])
            if not rows:
                continue  # a fixed colour per family: a panel without some family keeps the others' colours
            ax.plot([r["bits"] for r in rows], [r["delta_pct"] for r in rows], marker=marker, label=family, color=color)
            for r in rows:
                ax.annotate(r["method"], (r["bits"], r["delta_pct"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_title(_label(col), fontsize=9)
        ax.set_xlabel("stored bits per K/V element")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("perplexity increase over bf16 cache (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=sorted(assets.MODELS))
    p.add_argument("--contexts", type=int, nargs="*", default=[1024])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="windows per batch (memory vs speed)")
    p.add_argument("--text", default="pg", choices=["pg", "wiki"])
    p.add_argument("--methods", default=None, help="comma-separated subset of method names (bf16 always runs)")
    p.add_argument("--passkey", type=int, nargs="*", default=[], help="passkey context lengths")
    p.add_argument("--depths", type=float, nargs="*", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--passkey-trials", type=int, default=2)
    p.add_argument("--passkey-methods", default="bf16,KIVI-2,OScaR-paper-2,auto-2,KIVI-4,auto-4,quanto-2,quanto-4")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--resume", action="store_true", help="skip methods already in the results JSON")
    p.add_argument("--sliding", type=int, nargs=2, metavar=("WINDOW", "PERIOD"), default=None,
                   help="run the model as a Gemma-3-style sliding-window model (every PERIOD-th layer global)")
    p.add_argument("--layer-damage", action="store_true",
                   help="per-layer measured damage vs the bits-budget predictors (rank correlation)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        methods = standard_methods()
        if args.methods:
            keep = set(args.methods.split(",")) | {"bf16"}
            unknown = keep - {m.name for m in methods}
            if unknown:
                raise SystemExit(f"unknown methods {sorted(unknown)}; known: {[m.name for m in methods]}")
            methods = [m for m in methods if m.name in keep]
            methods.sort(key=lambda m: args.methods.split(",").index(m.name) if m.name in args.methods.split(",") else -1)
        try:
            import optimum.quanto  # noqa: F401
        except Exception as e:  # the incumbent is optional: report it instead of crashing
            print(f"quanto unavailable ({type(e).__name__}: {e}); skipping its rows")
            methods = [m for m in methods if m.kind != "quanto"]
        t = time.perf_counter()
        model, tok = assets.load_model(args.model, args.cache_dir)
        print(f"loaded {args.model} in {time.perf_counter() - t:.1f}s; {torch.get_num_threads()} threads", flush=True)
        name = args.model
        if args.sliding:
            model = sliding_variant(model, *args.sliding)
            name = f"{args.model}-sw{args.sliding[0]}x{args.sliding[1]}"
            for c in args.contexts:
                b = sliding_bytes(model, c + CONTINUATION + 1, OScaRConfig())
                (args.out / f"bytes_{name}_C{c}.json").write_text(json.dumps(b, indent=1))
                print(f"bytes at {c + CONTINUATION + 1} positions: {b}", flush=True)
        if args.layer_damage:
            for c in args.contexts:
                run_layer_damage(model, tok, name, c, args, args.out)
            return
        for c in args.contexts:
            run_perplexity(model, tok, name, c, args, methods, args.out)
            report(args.out)
        pk_names = set(args.passkey_methods.split(","))
        for c in args.passkey:
            run_passkey(model, tok, name, c, args, [m for m in methods if m.name in pk_names], args.out)
            report(args.out)
    print(report(args.out))


if __name__ == "__main__":
    main()
