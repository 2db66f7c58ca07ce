"""Accuracy measurements of KV methods on one model (DESIGN.md §6: same model, same text, decode path).

* :func:`continuation_nll` — prefill ``C`` tokens at full precision, then teacher-force the next ``M``
  tokens in chunks so every scored token reads the method's (quantized) cache; also records each layer's
  attention-module output for the per-layer relative error against the bf16 cache.
* :func:`passkey` — a pass key hidden at a given depth of a long haystack: the haystack is prefilled at
  full precision, then the question is a decode chunk and the answer is greedy-decoded, all reading the
  quantized cache.

The prefill is identical for every method, so both run it once and seed every method's cache with it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..bit_budget import record_prompt
from ..kernels.key_transform import NUM_QUERIES

from .caches import KVMethod, make_cache

__all__ = ["WindowResult", "make_windows", "prefill", "continuation_nll", "passkey_prompt", "passkey"]


def _forward(model, ids: torch.Tensor, cache):
    # transformers 5.24 calls the argument `cache`, 5.17 `past_key_values`.
    try:
        return model(input_ids=ids, cache=cache, use_cache=True)
    except TypeError:
        return model(input_ids=ids, past_key_values=cache, use_cache=True)


def make_windows(tokenizer, docs: list[str], length: int, n: int) -> list[torch.Tensor]:
    """``n`` token windows of ``length`` tokens, each starting at a different document.

    Window ``i`` starts at document ``i * len(docs) // n`` and continues into the following documents
    (joined by a blank line) when that one is shorter than ``length`` tokens.
    """
    if n > len(docs):
        raise ValueError(f"need at least {n} documents, got {len(docs)}")
    out = []
    for i in range(n):
        j, ids = i * len(docs) // n, []
        while len(ids) < length:
            ids += tokenizer(docs[j % len(docs)] + "\n\n", add_special_tokens=False)["input_ids"]
            j += 1
        out.append(torch.tensor(ids[:length]))
    return out


_record_queries = record_prompt  # one owner: the budget planner records the prompt's queries the same way


@torch.no_grad()
def prefill(model, ids: torch.Tensor, record_queries: int = NUM_QUERIES):
    """Full-precision prefill of ``ids [B, T]``.

    Returns ``(per-layer [(keys, values, last queries)], last logits [B, V])``; the queries (the last
    ``record_queries`` of the prompt, after RoPE) feed the adaptive key transform, as the cache would
    use the prompt's queries when it quantizes the prompt.
    """
    cache = DynamicCache()  # full layers everywhere: sliding-window layers keep their whole prompt (masked)
    queries: dict[int, torch.Tensor] = {}
    with _record_queries(model, queries, record_queries):
        try:
            out = model(input_ids=ids.to(model.device), cache=cache, use_cache=True, logits_to_keep=1)
        except TypeError:
            out = model(input_ids=ids.to(model.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    kv = [(layer.keys, layer.values, queries.get(i)) for i, layer in enumerate(cache.layers)]
    return kv, out.logits[:, -1].float()


def _attn_modules(model):
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not mods:
        raise ValueError("no `*.self_attn` modules found to record attention outputs")
    return mods


@dataclass
class WindowResult:
    nll: torch.Tensor  # [B] summed negative log-likelihood of each window's scored tokens (fp64)
    tokens: int  # scored tokens per window
    attn_outputs: list[torch.Tensor]  # per layer [B, M, hidden] attention-module outputs (fp32)
    kl: torch.Tensor | None = None  # [B] summed KL(bf16 || method) of the next-token distributions (fp64)


def _select_kv(prefill_kv, i: int):
    return [tuple(None if x is None else x[i:i + 1] for x in entry) for entry in prefill_kv]


@torch.no_grad()
def continuation_nll(
    model, ids: torch.Tensor, context: int, methods: list[KVMethod], chunk: int = 16, prefill_kv=None,
    progress=None,
) -> dict[str, WindowResult]:
    """NLL of ``ids[:, context + 1 : context + M + 1]`` per method, every prediction made in a decode chunk.

    ids: ``[B, context + M + 1]`` tokens (B windows run as one batch). The first ``context`` tokens are
    prefilled once (full precision) and shared by all methods; then tokens ``context .. context + M - 1``
    are fed ``chunk`` at a time, each chunk attending to the method's view of the history plus itself, and
    predict the next token. quanto runs one window at a time (its quantization axes include the batch).
    When a ``"bf16"`` method runs first, every later method also gets ``kl``: the summed KL divergence of its
    next-token distributions from the bf16 cache's (a lower-variance damage measure than the NLL change).
    """
    if ids.dim() == 1:
        ids = ids[None]
    m = ids.shape[1] - context - 1
    if m <= 0 or m % chunk:
        raise ValueError(f"ids has {ids.shape[1]} tokens: need context ({context}) + a multiple of chunk ({chunk}) + 1")
    if prefill_kv is None:
        prefill_kv, _ = prefill(model, ids[:, :context])
    mods = _attn_modules(model)
    store: list[list[torch.Tensor]] = [[] for _ in mods]
    hooks = [mod.register_forward_hook(lambda _m, _i, out, i=i: store[i].append(out[0].float()))
             for i, mod in enumerate(mods)]

    ref_logp: list[torch.Tensor] = []  # the bf16 method's log-probabilities per chunk (when it runs first)

    def run(method, rows, kv, record=False):
        cache = make_cache(method, model.config, kv)
        nll = torch.zeros(len(rows), dtype=torch.float64)
        kl = torch.zeros(len(rows), dtype=torch.float64)
        for j, start in enumerate(range(context, context + m, chunk)):
            x = ids[rows, start:start + chunk].to(model.device)
            logits = _forward(model, x, cache).logits
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            target = ids[rows, start + 1:start + chunk + 1].to(model.device)
            nll += torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), target, reduction="none").sum(1).double().cpu()
            logp = torch.log_softmax(logits.float(), -1)
            if record:
                ref_logp.append(logp)
            elif len(ref_logp) > j:
                ref = ref_logp[j]
                kl += (ref.exp() * (ref - logp)).sum((1, 2)).double().cpu()
        return nll, kl

    results = {}
    try:
        for method in methods:
            for s in store:
                s.clear()
            kl = None
            if method.kind == "quanto":
                nll = torch.cat([run(method, [i], _select_kv(prefill_kv, i))[0] for i in range(ids.shape[0])])
                n_chunks = m // chunk
                outs = [torch.cat([torch.cat(s[i * n_chunks:(i + 1) * n_chunks], 1) for i in range(ids.shape[0])])
                        for s in store]
            else:
                record = method.kind == "bf16" and not ref_logp
                nll, kl = run(method, list(range(ids.shape[0])), prefill_kv, record)
                kl = None if record or not ref_logp else kl
                outs = [torch.cat(s, 1) for s in store]
            results[method.name] = WindowResult(nll, m, outs, kl)
            if progress is not None:
                progress.update(1)
    finally:
        for h in hooks:
            h.remove()
    return results


def attention_rel_errors(result: WindowResult, reference: WindowResult) -> list[float]:
    """Per-layer ``||o - o_ref|| / ||o_ref||`` of the attention-module outputs, averaged over windows."""
    return [((o - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1).clamp_min(1e-30)).mean().item()
            for o, r in zip(result.attn_outputs, reference.attn_outputs)]


_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
_QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, haystack: str, context: int, depth: float, key: str):
    """``(prefix_ids, question_ids)``: ``context`` tokens of haystack with the needle at ``depth`` (0..1)."""
    q = tokenizer(_QUESTION, add_special_tokens=False)["input_ids"]
    needle = tokenizer(_NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
    hay = tokenizer(haystack, add_special_tokens=False)["input_ids"]
    n_hay = context - len(needle)
    if len(hay) < n_hay:
        raise ValueError(f"haystack has {len(hay)} tokens, need {n_hay}")
    at = int(round(depth * n_hay))
    ids = hay[:at] + needle + hay[at:n_hay]
    return torch.tensor(ids), torch.tensor(q)


@torch.no_grad()
def passkey(
    model, tokenizer, haystack: str, context: int, depths: list[float], methods: list[KVMethod], seed: int = 0,
    new_tokens: int = 6,
) -> dict[str, list[bool]]:
    """Per method, whether the greedy answer at each depth contains the pass key.

    The pass keys are 5-digit numbers drawn from ``seed`` (one per depth). The haystack with the needle is
    prefilled at full precision (batched over depths); the question and the answer read each method's cache.
    """
    rng = random.Random(seed)
    keys = [str(rng.randrange(10000, 100000)) for _ in depths]
    prompts = [passkey_prompt(tokenizer, haystack, context, d, k) for d, k in zip(depths, keys)]
    prefix = torch.stack([p for p, _ in prompts])
    question = torch.stack([q for _, q in prompts])
    kv, _ = prefill(model, prefix)
    out = {}
    for method in methods:
        rows = [[i] for i in range(len(depths))] if method.kind == "quanto" else [list(range(len(depths)))]
        found = [False] * len(depths)
        for r in rows:
            cache = make_cache(method, model.config, [tuple(None if x is None else x[r] for x in e) for e in kv])
            x, generated = question[r], []
            for _ in range(new_tokens):
                x = _forward(model, x.to(model.device), cache).logits[:, -1].argmax(-1, keepdim=True).cpu()
                generated.append(x)
            gen = torch.cat(generated, 1)
            for j, i in enumerate(r):
                found[i] = keys[i] in tokenizer.decode(gen[j]).replace(" ", "")
        out[method.name] = found
    return out


def perplexity(total_nll: float, tokens: int) -> float:
    """``exp(mean NLL)``."""
    return math.exp(total_nll / tokens)
