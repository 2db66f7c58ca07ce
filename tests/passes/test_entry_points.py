"""oscar.compile outcomes, the "oscar" backend string and the Inductor CustomGraphPass."""

import pytest
import torch
from torch import nn

import oscar_compile as oscar
from oscar_compile import OScaRConfig
from oscar_compile.passes import OScaRBackend, OScaRInductorPass, default_backend
from pass_helpers import CONFIG, decode_steps, oscar_reference
from pass_models import Decoder


class NoCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        q = self.proj(x).view(1, -1, 1, 32).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)


def test_model_without_sites_is_compiled_plainly_and_reported():
    torch.manual_seed(0)
    model = NoCache().eval()
    x = torch.randn(1, 8, 32)
    expected = model(x)
    out = oscar.compile(model, fullgraph=True)(x)
    report = model.oscar_report
    assert report.rewritten == 0 and report.kv_bytes_bf16 == 0 and report.graphs == 1
    assert report.skipped == [("<top>:scaled_dot_product_attention",
                               "key is computed in this graph (linear at linear), not read from a cache input")]
    torch.testing.assert_close(out, expected)
    assert "0 site(s) rewritten" in str(report)


def test_compiling_twice_returns_the_model_unchanged():
    model = Decoder(n_layers=1)
    assert oscar.compile(model, CONFIG) is model
    first = model._compiled_call_impl
    with pytest.warns(UserWarning, match="already compiled"):
        assert oscar.compile(model, CONFIG) is model
    assert model._compiled_call_impl is first
    with pytest.raises(ValueError, match="backend"):
        oscar.compile(Decoder(n_layers=1), backend="inductor")


def test_backend_string_and_dynamic_prefill_lengths():
    # torch.compile(m, backend="oscar"); three prompt lengths make Dynamo go dynamic on T
    torch.manual_seed(0)
    model = Decoder().eval()
    ref = Decoder().eval()
    ref.load_state_dict(model.state_dict())
    backend = default_backend(CONFIG)
    compiled = torch.compile(model, backend="oscar", options={"oscar_config": CONFIG}, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for prompt in (33, 20, 41):  # each prompt restarts at position 0 (the OScaR state resets)
        steps = decode_steps(prompt=prompt, decode=2, seed=prompt)
        with torch.no_grad():
            outs = [compiled(x, pos) for x, pos in steps]
        pairs = [name.split("/") for name in backend.report.caches]
        for o, r in zip(outs, oscar_reference(ref, steps, pairs, CONFIG)):
            torch.testing.assert_close(o, r, atol=2e-4, rtol=2e-4)
    assert backend.report.rewritten == 2


def test_out_of_order_write_raises_instead_of_wrong_numerics():
    model = Decoder(n_layers=1).eval()
    compiled = oscar.compile(model, CONFIG, fullgraph=True, dynamic=False)
    x, pos = decode_steps(prompt=8, decode=0)[0]
    compiled(x, pos)
    with pytest.raises(RuntimeError, match="out of order"):
        compiled(torch.randn(1, 1, 128), torch.tensor([20]))  # skips positions 8..19


def test_inductor_custom_pass_finds_sites_on_aten_graphs():
    model = Decoder(write="index_copy_").eval()
    p = OScaRInductorPass(CONFIG)
    assert p.uuid() == OScaRInductorPass(CONFIG).uuid()
    assert p.uuid() != OScaRInductorPass(OScaRConfig.kivi()).uuid()
    # a cached graph (same pass uuid) skips post-grad passes entirely: compile afresh
    with torch._inductor.config.patch(post_grad_custom_post_pass=p, fx_graph_cache=False), torch.no_grad():
        torch.compile(model, fullgraph=True, dynamic=False)(torch.randn(1, 5, 128), torch.arange(5))
    assert [s.mask_kind for _, s in p.found] == ["causal-position-unchecked"] * 2
    assert {s.write_op for _, s in p.found} == {"index_put"}
    assert all(n.endswith("_scaled_dot_product_flash_attention_for_cpu") for n, _ in p.found)
    assert p.report.rewritten == 0 and len(p.report.found) == 2 and "discovery only" in str(p.report)


def test_replaced_cache_that_a_later_graph_cannot_rewrite_raises():
    # after the caches became OScaR state, a new code path (ALiBi bias switched on) cannot be rewritten:
    # the pass raises instead of reading the stale/freed full-precision cache
    model = Decoder(n_layers=1).eval()
    compiled = oscar.compile(model, CONFIG, fullgraph=True, dynamic=False)
    x, pos = decode_steps(prompt=8, decode=0)[0]
    compiled(x, pos)
    model.layers[0].alibi = True
    model.layers[0].register_buffer("slopes", torch.ones(4))
    with pytest.raises(Exception, match="held as OScaR state|replaced by OScaR state"):
        compiled(torch.randn(1, 1, 128), torch.tensor([8]))


def test_autograd_enabled_leaves_sites_untouched():
    backend = OScaRBackend(CONFIG, compiler="eager")
    model = Decoder(n_layers=1)
    plain = Decoder(n_layers=1)
    plain.load_state_dict(model.state_dict())
    x, pos = decode_steps(prompt=8, decode=0)[0]
    out = torch.compile(model, backend=backend, fullgraph=True)(x, pos)
    assert torch.equal(out, plain(x, pos))
    assert backend.report.rewritten == 0 and all("autograd" in r for _, r in backend.report.skipped)
