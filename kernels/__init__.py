"""OScaR numerics and kernels (installed as ``oscar_compile.kernels``; imports no other project code).

Each kernel module keeps a pure-torch reference (the CPU path and the test oracle) beside its Triton
kernel. ``packing`` alone owns the byte layout of the codes.
"""

from .append_kv import append_kv, append_kv_ref
from .attention_ref import quantized_attention_ref
from .cache_attention import cache_attention, cache_attention_ref, num_kv_splits
from .cache_layout import CacheFormat, CacheTensors, allocate_cache, cache_nbytes
from .hadamard import hadamard_block_size, hadamard_matrix, hadamard_transform
from .key_transform import choose_key_flags
from .packing import SUPPORTED_BITS, codes_per_byte, pack_codes, unpack_codes
from .quantization import (
    QuantizedKeys,
    QuantizedValues,
    dequantize_groups,
    dequantize_keys,
    dequantize_keys_transformed,
    dequantize_values,
    dequantize_values_transformed,
    head_flags,
    key_token_norms,
    quantize_groups,
    quantize_keys,
    quantize_values,
)

__all__ = [
    "CacheFormat",
    "CacheTensors",
    "allocate_cache",
    "append_kv",
    "append_kv_ref",
    "cache_attention",
    "cache_attention_ref",
    "cache_nbytes",
    "choose_key_flags",
    "SUPPORTED_BITS",
    "QuantizedKeys",
    "QuantizedValues",
    "codes_per_byte",
    "dequantize_groups",
    "dequantize_keys",
    "dequantize_keys_transformed",
    "dequantize_values",
    "dequantize_values_transformed",
    "hadamard_block_size",
    "hadamard_matrix",
    "hadamard_transform",
    "head_flags",
    "key_token_norms",
    "num_kv_splits",
    "pack_codes",
    "quantize_groups",
    "quantize_keys",
    "quantize_values",
    "quantized_attention_ref",
    "unpack_codes",
]
