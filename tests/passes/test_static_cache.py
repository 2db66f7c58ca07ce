"""gpt-fast-style decoders: static buffers written in place, SDPA or matmul-softmax attention."""

import pytest
import torch

from pass_helpers import check_rewrite, decode_steps
from pass_models import Decoder, StackedCacheDecoder


@pytest.mark.parametrize(
    "write,gqa",
    [("setitem", "repeat_interleave"), ("index_copy_", "repeat_kv")],
)
def test_gpt_fast_sdpa(write, gqa):
    report = check_rewrite(lambda: Decoder(write=write, gqa=gqa), decode_steps(), rewritten=2)
    site = next(iter(report.sites.values()))
    assert (site.kind, site.heads, site.kv_heads, site.head_dim) == ("sdpa", 4, 2, 32)
    assert site.mask_kind == "causal-position"


def test_matmul_softmax_attention():
    report = check_rewrite(lambda: Decoder(attn="matmul", write="index_copy_", gqa="repeat_kv"), decode_steps(), rewritten=2)
    site = next(iter(report.sites.values()))
    assert site.kind == "decomposed" and site.mask_kind == "causal-position"


def test_two_layers_share_one_cache():
    # layer 1 reads the cache layer 0 writes (cross-layer KV sharing): 2 sites, 1 cache, one append
    report = check_rewrite(lambda: Decoder(share_cache=True), decode_steps(), rewritten=2)
    assert len(report.caches) == 1, str(report)


def test_batch_of_two_bf16():
    # B=2 sequences written at the same positions; bf16 model, caches and OScaR residual
    check_rewrite(lambda: Decoder(batch=2), decode_steps(batch=2), rewritten=2, dtype=torch.bfloat16)


def test_caches_as_plain_attributes():
    # caches kept as plain tensor attributes instead of registered buffers
    def make():
        model = Decoder(write="index_copy_")
        for layer in model.layers:
            cache = layer.kv_cache
            cache.k_cache, cache.v_cache = cache._buffers.pop("k_cache"), cache._buffers.pop("v_cache")
        return model

    report = check_rewrite(make, decode_steps(decode=2), rewritten=2)
    assert set(report.caches) == {f"layers.{i}.kv_cache.k_cache/layers.{i}.kv_cache.v_cache" for i in range(2)}


def test_stacked_per_layer_buffers_are_reported_and_left_exact():
    # one [L, B, H, S, D] buffer pair for all layers, layer i writing k[i]: OScaR state replaces whole per-layer
    # caches (the module's attribute), so both sites stay as they are, reported, outputs exactly plain Inductor's
    report = check_rewrite(
        StackedCacheDecoder, decode_steps(decode=2), rewritten=0, skipped=2, reasons=["stacked [L, B, H, S, D]"]
    )
    assert [name for name, _ in report.skipped] == [
        "<top>:scaled_dot_product_attention", "<top>:scaled_dot_product_attention#1"
    ]
