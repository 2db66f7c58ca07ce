"""oscar_compile: the OScaR 2-bit KV cache (arXiv 2605.19660) for any PyTorch model.

Public API so far:

- :class:`OScaRConfig` — bits, group size, residual window, and the three OScaR switches.
- :func:`fake_quantize` — quantize/dequantize a K/V history exactly as the cache would.
- :func:`compile` — ``model = oscar.compile(model)``: rewrite every attention-with-KV-cache site to OScaR
  and compile with Inductor (``model.oscar_report`` says what was rewritten or skipped).
"""

from .config import OScaRConfig
from .fake_quant import fake_quantize
from .api import compile  # noqa: A001  (oscar.compile, like torch.compile)

__all__ = ["OScaRConfig", "compile", "fake_quantize"]
__version__ = "0.1.0"
