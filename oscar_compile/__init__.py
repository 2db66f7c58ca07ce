"""oscar_compile: the OScaR 2-bit KV cache (arXiv 2605.19660) for any PyTorch model.

Public API so far:

- :class:`OScaRConfig` — bits, group size, residual window, and the three OScaR switches.
- :func:`fake_quantize` — quantize/dequantize a K/V history exactly as the cache would.
- :func:`compile` — ``model = oscar.compile(model)``: rewrite every attention-with-KV-cache site to OScaR
  and compile with Inductor (``model.oscar_report`` says what was rewritten or skipped).
- :class:`OScaRCache` / :func:`use_oscar_cache` — a static transformers cache holding the OScaR state,
  and the hook that makes ``model.generate`` use it (see README, "Torch integration").
"""

from .config import OScaRConfig
from .fake_quant import fake_quantize
from .api import compile  # noqa: A001  (oscar.compile, like torch.compile)

__all__ = ["OScaRCache", "OScaRConfig", "compile", "fake_quantize", "use_oscar_cache"]


def __getattr__(name):  # transformers integration, imported on first use (transformers is a heavy import)
    if name in ("OScaRCache", "use_oscar_cache"):
        from . import hf_cache

        return getattr(hf_cache, name)
    raise AttributeError(f"module 'oscar_compile' has no attribute {name!r}")
__version__ = "0.1.0"
