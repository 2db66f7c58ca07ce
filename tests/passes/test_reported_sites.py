"""Sites the pass must report and leave exactly as they were."""

from pass_helpers import check_rewrite, decode_steps
from pass_models import CatCacheDecoder, CrossAttentionDecoder, Decoder


def test_alibi_bias_is_reported_not_rewritten():
    check_rewrite(
        lambda: Decoder(alibi=True), decode_steps(decode=1), rewritten=0, skipped=2, reasons=["additive attention bias"]
    )


def test_cross_attention_over_encoder_cache_is_reported():
    # the self-attention is rewritten; the cross-attention reads a cache the graph never writes
    check_rewrite(
        CrossAttentionDecoder, decode_steps(decode=1), rewritten=1, skipped=1, reasons=["cross-attention"]
    )


def test_cat_grown_cache_is_reported():
    check_rewrite(CatCacheDecoder, decode_steps(decode=1), rewritten=0, skipped=1, reasons=["torch.cat"])


def test_head_dim_not_multiple_of_group_is_reported():
    check_rewrite(
        lambda: Decoder(dim=64, heads=4, kv_heads=2), decode_steps(dim=64, decode=0), rewritten=0, skipped=2,
        reasons=["head_dim 16 not a multiple of group_size 32"],
    )
