"""``check_rewrite``: the one helper every pass test uses (STYLE convention 14).

eager vs ``oscar.compile(fullgraph=True)``: the report shows the expected sites, ``oscar::`` ops appear in the
Inductor code, zero graph breaks, rewritten caches are OScaR halves in their modules, and outputs match

* the OScaR reference (:func:`oscar_reference`) when something is rewritten, within ``ATOL``/``RTOL``;
* exactly the plain-Inductor compile of the same model when nothing is (untouched sites are untouched).
"""

from __future__ import annotations

import copy
import functools
import re

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import oscar_compile as oscar
from oscar_compile import OScaRConfig, fake_quantize
from oscar_compile.kv_tensor import is_oscar_cache

# fp32 models; OScaR attention runs in fp32 like SDPA, so differences are rounding only
ATOL = 2e-4
RTOL = 2e-4
# bf16 models: the model's SDPA runs in bf16, the OScaR op in fp32 then rounds once (one bf16 ulp ~ 8e-3)
TOLERANCES = {torch.float32: (ATOL, RTOL), torch.bfloat16: (4e-2, 2e-2)}

# residual 32 so a few dozen tokens already quantize complete blocks
CONFIG = OScaRConfig.paper(residual_length=32)


class GraphRecorder:
    """``OScaRBackend(compiler=GraphRecorder())``: keeps every rewritten GraphModule (``.graphs``), then compiles
    it with the ``torch.compile`` backend ``then`` ("eager": the rewritten graph runs as is)."""

    def __init__(self, then="eager"):
        self.graphs, self.then = [], then

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend(self.then)(gm, example_inputs)


def attr(module, path):
    """``module.a.b.c`` for ``"a.b.c"`` (buffers or plain tensor attributes); ``"k[1]"``: layer 1 of ``k``."""
    path, _, index = path.partition("[")
    tensor = functools.reduce(getattr, path.split("."), module)
    return tensor[int(index.rstrip("]"))] if index else tensor


@torch.no_grad()
def oscar_reference(model, steps, cache_pairs, config, queries=None):
    """Run ``model`` eagerly with each named cache holding what an OScaR cache would hold.

    Before each step the first ``L`` slots of every cache (``L`` = tokens stored so far) are replaced by
    ``fake_quantize`` of the full-precision history; the step then writes its own tokens at full precision
    and attends to both: attend-then-append (DESIGN §2). ``queries``: key-cache name -> the first step's
    queries, for "auto" configs (decided from the first step, as the OScaR state does).
    """
    cache_names = [n for pair in cache_pairs for n in pair]
    history = {n: torch.zeros_like(attr(model, n)) for n in cache_names}
    stored, outs, first = 0, [], None
    for x, pos in steps:
        if int(pos[0]) == 0:
            stored, first = 0, len(pos)
        for k_name, v_name in cache_pairs:
            extra = {} if queries is None else {"queries": queries[k_name], "prompt_length": first}
            kh, vh = fake_quantize(history[k_name][:, :, :stored], history[v_name][:, :, :stored], config, **extra)
            attr(model, k_name)[:, :, :stored] = kh
            attr(model, v_name)[:, :, :stored] = vh
        outs.append(model(x, pos))
        for n in cache_names:
            history[n][:, :, pos] = attr(model, n)[:, :, pos]
        stored = int(pos[-1]) + 1
    return outs


def check_rewrite(make_model, steps, *, rewritten, skipped=0, config=CONFIG, reasons=(), dtype=torch.float32):
    """Compile ``make_model()`` with oscar.compile and check it against the references; returns the report.

    steps: ``[(x, pos), ...]`` run in order. ``reasons``: substrings expected among the skip reasons.
    dtype: the model's (and inputs') dtype.
    """
    torch.manual_seed(0)
    model = make_model().eval().to(dtype)
    steps = [(x.to(dtype), pos) for x, pos in steps]
    atol, rtol = TOLERANCES[dtype]
    eager = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    counters.clear()

    compiled = oscar.compile(model, config, fullgraph=True, dynamic=False)
    outs, code = [], []
    with torch.no_grad():
        for i, (x, pos) in enumerate(steps):
            if i < 2:  # prefill and first decode shape: capture Inductor's code
                out, src = run_and_get_code(compiled, x, pos)
                code.extend(src)
            else:
                out = compiled(x, pos)
            outs.append(out)
    report = compiled.oscar_report

    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert report.rewritten == rewritten, str(report)
    assert len(report.skipped) == skipped, str(report)
    for r in reasons:
        assert any(r in reason for _, reason in report.skipped), f"no skip reason containing {r!r}:\n{report}"
    text = "\n".join(code)
    if rewritten:
        assert "torch.ops.oscar.attend_append.default" in text
        # quantize-on-write works in place on the state: no copy of the cache per step (DESIGN §4 pitfall):
        # the 9 quantized/residual tensors after the query are the graph's own inputs, not copies
        calls = [_call_args(text, m.end()) for m in re.finditer(r"torch\.ops\.oscar\.attend_append\.default\(", text)]
        for args in calls:
            assert all(re.fullmatch(r"arg\d+_1", a) for a in args[1:10]), args
        assert 0 < report.kv_bytes_oscar < report.kv_bytes_bf16
    else:
        assert "oscar" not in text and report.kv_bytes_bf16 == 0

    pairs = [name.split("/") for name in report.caches]
    for name in [n for pair in pairs for n in pair]:  # the module holds OScaR state in the cache's place
        assert is_oscar_cache(attr(compiled, name)), name

    if rewritten:
        full = copy.deepcopy(eager)
        ref = oscar_reference(eager, steps, pairs, config)
        for i, (o, r) in enumerate(zip(outs, ref)):
            torch.testing.assert_close(o, r, atol=atol, rtol=rtol, msg=lambda m: f"step {i}: {m}")
        with torch.no_grad():  # the quantized cache matters: full precision is much farther than the oracle
            last = [full(x, pos) for x, pos in steps][-1]
        to_oracle = (ref[-1] - outs[-1]).float().norm()
        to_full = (last - outs[-1]).float().norm()
        assert to_full > 5 * to_oracle, (to_full, to_oracle)
        assert counters["oscar"]["sites_rewritten"] >= rewritten
    else:
        plain_c = torch.compile(plain, fullgraph=True, dynamic=False)
        with torch.no_grad():
            for i, (x, pos) in enumerate(steps):
                assert torch.equal(outs[i], plain_c(x, pos)), f"step {i}: untouched model output changed"
                torch.testing.assert_close(outs[i], eager(x, pos), atol=1e-5, rtol=1e-5)
    return report


def _call_args(text: str, start: int) -> list[str]:
    """The top-level arguments of the call whose ``(`` ends at ``text[start - 1]``."""
    args, depth, cur = [], 0, ""
    for ch in text[start:]:
        if ch == ")" and depth == 0:
            break
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return args + [cur.strip()]


def decode_steps(batch=1, dim=128, prompt=40, decode=3, seed=0):
    """A prefill of ``prompt`` tokens then ``decode`` single-token steps (enough to quantize blocks of 32)."""
    g = torch.Generator().manual_seed(seed)
    steps = [(torch.randn(batch, prompt, dim, generator=g), torch.arange(prompt))]
    for i in range(decode):
        steps.append((torch.randn(batch, 1, dim, generator=g), torch.arange(prompt + i, prompt + i + 1)))
    return steps
