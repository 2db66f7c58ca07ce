"""Accuracy evaluation of KV-cache methods on real models (continuation perplexity, passkey, attention error).

Run ``python benchmarks/accuracy.py --help``; the pieces are importable for tests and the demo.
"""

from ..config import AUTO, OScaRConfig
from .caches import FakeQuantCache, FakeQuantLayer, KVMethod, bits_per_element, make_cache
from .harness import attention_rel_errors, continuation_nll, make_windows, passkey, perplexity, prefill

__all__ = [
    "FakeQuantCache",
    "FakeQuantLayer",
    "KVMethod",
    "attention_rel_errors",
    "bits_per_element",
    "continuation_nll",
    "make_cache",
    "make_windows",
    "passkey",
    "perplexity",
    "prefill",
    "standard_methods",
    "BUDGETS",
]


BUDGETS = (2.25, 2.5, 3.0)  # the bits-budget rows (OScaRConfig(bits=b), adaptive keys)


def _oscar(name: str, bits: int = 2, rk=False, rv=False, ts=False, sink: int = 0) -> KVMethod:
    return KVMethod(name, "oscar", OScaRConfig(bits=bits, rotate_keys=rk, rotate_values=rv, token_scaling=ts), bits, sink)


def standard_methods() -> list[KVMethod]:
    """Every row of the accuracy table, in table order."""
    return [
        KVMethod("bf16", "bf16"),
        _oscar("KIVI-2"),
        _oscar("rotK-2", rk=True),
        _oscar("rotV-2", rv=True),
        _oscar("scaleK-2", ts=True),
        _oscar("rotK+rotV-2", rk=True, rv=True),
        _oscar("rotK+scaleK-2", rk=True, ts=True),
        _oscar("rotV+scaleK-2", rv=True, ts=True),
        _oscar("OScaR-paper-2", rk=True, rv=True, ts=True),
        _oscar("auto-2", rk=AUTO, rv=True, ts=True),
        _oscar("auto+sink-2", rk=AUTO, rv=True, ts=True, sink=1),
        _oscar("autoRS-2", rk=AUTO, rv=True, ts=AUTO),
        KVMethod("auto-keysonly-2", "oscar", OScaRConfig.adaptive(), 2, use_queries=False),
        _oscar("KIVI-4", bits=4),
        _oscar("OScaR-paper-4", bits=4, rk=True, rv=True, ts=True),
        _oscar("auto-4", bits=4, rk=AUTO, rv=True, ts=True),
        *(KVMethod(f"budget-{b:g}", "oscar", OScaRConfig(bits=b), 2) for b in BUDGETS),
        KVMethod("auto-2-keepSW", "oscar", OScaRConfig(), 2, quantize_sliding=False),
        KVMethod("quanto-2", "quanto", nbits=2),
        KVMethod("quanto-4", "quanto", nbits=4),
    ]
