"""Architecture sweep: every transformers causal-LM model type, plain vs OScaR, no crash and no silent wrong answer.

For each model type in transformers' causal-LM auto mapping (one subprocess each, ``--timeout`` seconds):

1. a tiny random config from the config class's defaults with the sizes shrunk (2 layers, hidden 128,
   4 heads / 2 kv heads of head_dim 32, 512-token vocabulary, small MoE; sub-configs shrunk the same way);
2. greedy ``generate`` of ``--new`` tokens after a 150-token prompt on the plain model (float32, CPU);
3. the same through the OScaR cache, **eager path**: ``use_oscar_cache(model, config)`` and eager
   ``generate`` (the same cache and ``oscar::sdpa`` ops ``oscar.compile`` installs, run eagerly), for
   ``OScaRConfig()`` (default, 2 bits), ``OScaRConfig.paper(bits=4)`` and ``OScaRConfig(residual_length=256)``
   (nothing is quantized for a 158-token sequence: a bug check, the result must match plain to float error);
4. for the types in ``--compile-types``, the **compile path**: ``oscar.compile(model)`` (OScaR backend +
   Inductor, default config) and its ``oscar_report``.

Columns: ``rel4`` / ``rel2`` / ``relfp``: relative logit difference ``||oscar - plain|| / ||plain||`` over the
generated steps up to and including the first one whose token differs (same inputs so far).

Classes (eager path):

* ``plain-fails``: the plain model cannot generate (or the tiny config cannot be built);
* ``crash``: an OScaR run raises where the plain model works;
* ``untouched``: the model was left as transformers runs it and a reason was given (warning / report),
  output identical to plain;
* ``rewritten``: every KV layer held OScaR state, output close to plain, no-quantization run equal to plain;
* ``partial``: some layers kept in transformers' form, each listed with why (``OScaRCache.kept_layers``);
* ``silent``: output differs from plain while nothing says why (unreported kept layers, untouched without a
  reason, or the no-quantization run differs from plain: the OScaR path computes something else).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/arch_sweep.py                       # every type
    OMP_NUM_THREADS=1 python benchmarks/arch_sweep.py --types llama,bloom --timeout 120
    ... --json benchmarks/arch_sweep_results.json --markdown sweep.md --compile-types llama,mistral
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
import warnings

PROMPT = 150
NEW = 8
CLOSE = 0.05  # rel4 above this is flagged "far" (Llama family <= 0.035)
EXACT = 1e-4  # relfp / untouched: float error only

_LAYERS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers", "decoder_layers")
_SIZES = {
    "hidden_size": 128, "d_model": 128, "n_embd": 128, "n_embed": 128,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "head_dim": 32, "kv_channels": 32, "attention_head_dim": 32, "v_head_dim": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "qk_head_dim": 32, "kv_lora_rank": 32, "q_lora_rank": 32,
    "intermediate_size": 256, "ffn_dim": 256, "n_inner": 256, "ffn_hidden_size": 256, "d_ff": 256,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "index_head_dim": 32, "index_n_heads": 4, "ffn_hidden_size": 256,
    "vocab_size": 512,
}  # fmt: skip
_KV = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_n_heads", "multi_query_group_num")
_CAPPED = {"num_experts_per_tok": 2, "moe_topk": 2, "moe_top_k": 2, "n_group": 1, "topk_group": 1, "index_topk": 64,
           "first_k_dense_replace": 1, "rotary_dim": 16, "max_position_embeddings": 4096, "max_seq_len": 4096}  # fmt: skip
_NOT_CONFIGS = ("id2label", "label2id", "rope_parameters", "rope_scaling", "quantization_config")
_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id")


def shrink_dict(d: dict, depth: int = 0) -> dict:
    """The config dict ``d`` (``to_dict()``) with its sizes shrunk (sub-config dicts too); a new dict."""
    d = dict(d)
    n_old = next((d[k] for k in _LAYERS if isinstance(d.get(k), int)), None)
    for key, v in list(d.items()):
        if isinstance(v, dict) and key not in _NOT_CONFIGS and depth < 2:
            d[key] = shrink_dict(v, depth + 1)
        elif isinstance(v, bool) or not isinstance(v, int):
            continue
        elif key in _LAYERS:
            d[key] = 2
        elif key in _KV:
            d[key] = 1 if v == 1 else 2
        elif key in _CAPPED:
            d[key] = min(v, _CAPPED[key])
        elif key in _SIZES and v > 0:
            d[key] = _SIZES[key]
    if isinstance(d.get("kv_lora_rank"), int):  # latent attention: one kv head per query head
        for key in _KV:
            if key in d and isinstance(d[key], int):
                d[key] = d.get("num_attention_heads", 4)
    for key, v in list(d.items()):  # per-layer dicts keyed by layer index keep the first two layers
        if isinstance(v, dict) and v and all(str(k).isdigit() for k in v):
            d[key] = {k: w for k, w in v.items() if int(k) < 2}
    # per-layer lists (layer_types, mlp_only_layers, ...) follow the layer count: keep two layers, of two
    # different types where the model mixes them (a hybrid keeps one attention and one other layer)
    kinds = d.get("layer_types")
    keep = [0, 1]
    if isinstance(kinds, list) and n_old and len(kinds) == n_old:
        firsts = [kinds.index(k) for k in dict.fromkeys(kinds)]
        attn = [i for i in firsts if "attention" in str(kinds[i])]
        keep = sorted(list(dict.fromkeys(attn[:1] + firsts + [0, 1]))[:2])
    for key, v in list(d.items()):
        if isinstance(v, list) and n_old and n_old != 2 and len(v) == n_old:
            d[key] = [v[i] for i in keep]
    vocab = d.get("vocab_size")
    if isinstance(vocab, int):
        for key in _TOKENS:
            v = d.get(key)
            if isinstance(v, int) and v >= vocab:
                d[key] = vocab - 2
            elif isinstance(v, list):
                d[key] = [t if t < vocab else vocab - 2 for t in v]
        for key, v in list(d.items()):
            if key.endswith("_token_id") and isinstance(v, int) and v >= vocab:
                d[key] = vocab - 3
    return d


def tiny_config(model_type: str):
    """A tiny config of ``model_type``: its config class's defaults with the sizes shrunk."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    d = shrink_dict(cls().to_dict())
    d.pop("transformers_version", None)
    return cls.from_dict(d)


def _rel(plain, other) -> tuple[float, int]:
    """(relative logit difference over steps up to the first differing token, steps compared)."""
    import torch

    pt, ot = plain["tokens"], other["tokens"]
    k = len(pt)
    for i, (a, b) in enumerate(zip(pt, ot)):
        if a != b:
            k = i + 1
            break
    a = torch.stack(plain["logits"][:k]).float()
    b = torch.stack(other["logits"][:k]).float()
    return float((a - b).norm() / a.norm().clamp_min(1e-12)), k


def _generate(model, ids):
    import torch

    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            num_beams=1, return_dict_in_generate=True, output_logits=True, pad_token_id=0,
        )  # fmt: skip
    return {"tokens": out.sequences[0, ids.shape[1]:].tolist(), "logits": [l[0].detach() for l in out.logits],
            "cache": getattr(out, "past_key_values", None)}  # fmt: skip


def _cache_state(cache) -> dict:
    """Which layers of the cache generate used held OScaR state, which were kept (and why)."""
    from oscar_compile.hf_cache import OScaRCache, OScaRLayer

    if not isinstance(cache, OScaRCache):
        return {"cache": type(cache).__name__ if cache is not None else None, "oscar": [], "kept": {}, "other": []}
    oscar, other = [], []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, OScaRLayer):
            (oscar if layer.host_length > 0 else other).append(i)
    return {"cache": "OScaRCache", "oscar": oscar, "kept": {str(k): v for k, v in cache.kept_layers.items()},
            "other": other, "n_layers": len(cache.layers)}  # fmt: skip


def worker(model_type: str, compile_path: bool) -> dict:
    import torch
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import oscar_compile as oscar
    from oscar_compile import OScaRConfig
    from oscar_compile.hf_cache import hf_unsupported_reason, use_oscar_cache

    torch.set_num_threads(1)
    res = {"type": model_type, "model": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]}
    try:
        import transformers

        cls = getattr(transformers, res["model"])
        config = tiny_config(model_type)
        torch.manual_seed(0)
        model = cls(config).eval()
        vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 512
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, min(vocab, 512) - 2, (1, PROMPT), generator=g)
        plain = _generate(model, ids)
    except Exception as e:  # noqa: BLE001
        res.update(cls="plain-fails", error=_err(e))
        return res
    res["reason"] = hf_unsupported_reason(model)
    runs = {"rel2": OScaRConfig(), "rel4": OScaRConfig.paper(bits=4), "relfp": OScaRConfig(residual_length=256)}
    for name, cfg in runs.items():
        m = copy.deepcopy(model)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # every layer type through OScaR: the default keeps a hybrid's window layers in transformers' layer
                use_oscar_cache(m, cfg, quantize_sliding=True)
            out = _generate(m, ids)
        except Exception as e:  # noqa: BLE001
            res.update(cls="crash", error=f"{name}: {_err(e)}")
            return res
        res[name], res[name + "_steps"] = _rel(plain, out)
        res[name + "_same_tokens"] = out["tokens"] == plain["tokens"]
        if name == "rel4":
            res["state"] = _cache_state(out["cache"])
            res["warnings"] = [str(w.message)[:300] for w in caught if issubclass(w.category, UserWarning)]
    if compile_path:
        m = copy.deepcopy(model)
        try:
            t0 = time.time()
            oscar.compile(m)
            out = _generate(m, ids)
            res["compile_rel2"], _ = _rel(plain, out)
            rep = m.oscar_report
            res["compile_report"] = {"rewritten": rep.rewritten, "skipped": [list(s) for s in rep.skipped][:6],
                                     "seconds": round(time.time() - t0, 1)}  # fmt: skip
        except Exception as e:  # noqa: BLE001
            res["compile_error"] = _err(e)
    res["cls"] = classify(res)
    return res


def classify(res: dict) -> str:
    state = res.get("state", {})
    oscar, kept, other = state.get("oscar", []), state.get("kept", {}), state.get("other", [])
    fp_ok = res.get("relfp", 0.0) <= EXACT
    if not oscar:
        if res.get("relfp", 1) <= EXACT and res.get("rel4", 1) <= EXACT and (res.get("reason") or kept):
            return "untouched"
        return "silent"
    if not fp_ok:
        return "silent"
    if kept or other:
        return "partial" if not other else "silent"
    return "rewritten"


def _err(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {str(e)[:300]}{where}"


def all_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def run_sweep(types, timeout: float, compile_types=()) -> list[dict]:
    results = []
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    for t in types:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", t]
        if t in compile_types:
            cmd.append("--compile")
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            line = [l for l in p.stdout.splitlines() if l.startswith("{")]
            res = json.loads(line[-1]) if line else {"type": t, "cls": "crash", "error": f"worker died: {p.stderr[-300:]}"}
        except subprocess.TimeoutExpired:
            res = {"type": t, "cls": "timeout", "error": f"no result in {timeout:.0f} s"}
        res["seconds"] = round(time.time() - t0, 1)
        results.append(res)
        print(f"{t:28s} {res['cls']:10s} rel4={_fmt(res.get('rel4'))} relfp={_fmt(res.get('relfp'))} "
              f"{res.get('error') or _why(res)}"[:220], flush=True)  # fmt: skip
    return results


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}" if x >= 1e-3 or x == 0 else f"{x:.0e}"


def _why(res: dict) -> str:
    if res.get("reason"):
        return res["reason"][:160]
    kept = res.get("state", {}).get("kept", {})
    if kept:
        return "kept " + ", ".join(f"{k}: {v}" for k, v in list(kept.items())[:2])[:160]
    return ""


def markdown(results: list[dict]) -> str:
    import torch
    import transformers

    from collections import Counter

    counts = Counter(r["cls"] for r in results)
    far = [r["type"] for r in results if r["cls"] == "rewritten" and r.get("rel4", 0) > CLOSE]
    lines = [
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, CPU, one core; {len(results)} model types; "
        f"prompt {PROMPT} tokens, {NEW} greedy new tokens, float32.",
        "",
        "Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; rewritten with rel4 > {CLOSE}: {len(far)}",
        "",
        "`rel2`/`rel4`/`relfp`: eager path (`use_oscar_cache` + eager `generate`), default config / "
        "`OScaRConfig.paper(bits=4)` / `residual_length=256` (nothing quantized); `compile`: `oscar.compile` "
        "(Inductor), default config, sites rewritten (only the types run with `--compile-types`).",
        "",
        "| model type | class | rel2 | rel4 | relfp | compile | first reason or error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        comp = r.get("compile_report")
        comp = f"{comp['rewritten']} rewritten, {len(comp['skipped'])} skipped, rel2 {_fmt(r.get('compile_rel2'))}" if comp else ("error" if r.get("compile_error") else "")
        why = (r.get("error") or _why(r)).replace("|", "/").replace("\n", " ")[:140]
        lines.append(f"| {r['type']} | {r['cls']} | {_fmt(r.get('rel2'))} | {_fmt(r.get('rel4'))} | "
                     f"{_fmt(r.get('relfp'))} | {comp} | {why} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", help="comma-separated model types (default: every causal-LM type)")
    ap.add_argument("--start", help="first model type (alphabetical) to run")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--compile-types", default="", help="types also run through oscar.compile (Inductor)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--from-json", help="only print the markdown table of a results JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            print(markdown(json.load(f)["results"]))
        return
    if args.worker:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import logging

        logging.disable(logging.WARNING)
        res = worker(args.worker, args.compile)
        print(json.dumps(res, default=str))
        return
    types = args.types.split(",") if args.types else all_types()
    if args.start:
        types = [t for t in types if t >= args.start]
    compile_types = set(filter(None, args.compile_types.split(",")))
    results = []
    for t in types:  # the JSON is updated after every type (an interrupted sweep keeps what it ran)
        results += run_sweep([t], args.timeout, compile_types)
        if args.json:
            old = {}
            if os.path.exists(args.json):
                with open(args.json) as f:
                    old = {r["type"]: r for r in json.load(f).get("results", [])}
            old.update({r["type"]: r for r in results})
            with open(args.json, "w") as f:
                json.dump({"results": sorted(old.values(), key=lambda r: r["type"])}, f, indent=1, default=str)
    md = markdown(results)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    print(md)


if __name__ == "__main__":
    main()
