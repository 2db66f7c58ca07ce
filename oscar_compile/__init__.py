"""oscar_compile: the OScaR 2-bit KV cache (arXiv 2605.19660) for any PyTorch model.

Public API so far:

- :class:`OScaRConfig` — bits, group size, residual window, and the three OScaR switches.
- :func:`fake_quantize` — quantize/dequantize a K/V history exactly as the cache would.
"""

from .config import OScaRConfig
from .fake_quant import fake_quantize

__all__ = ["OScaRConfig", "fake_quantize"]
__version__ = "0.1.0"
