"""Graph passes that find attention-with-KV-cache sites and rewrite them to OScaR ops.

Installed as ``oscar_compile.passes``.

Approach (one pass, on the Dynamo graph; see README "oscar.compile"):

1. :mod:`.sites` finds attention nodes (SDPA in torch or aten form, or decomposed
   matmul-scale-mask-softmax-matmul), classifies the mask and checks preconditions; :mod:`.cache_trace`
   traces key/value back through layout ops (views, transposes, repeat_kv / repeat_interleave GQA, casts,
   sequence prefixes) to graph inputs and finds the in-place writes of those inputs (``index_copy_``,
   ``index_put_``/setitem, ``copy_`` into a slice); :mod:`.graph` is the shared op vocabulary of torch IR
   and ATen. The matcher returns a :class:`~.sites.Site` or a reason. :mod:`.patterns` holds the forms
   seen in the wild as plain torch functions (the matcher's specification and test corpus).
2. :mod:`.rewrite` groups sites by cache and rewrites a group whole (or not at all): the cache becomes the
   OScaR tensor-subclass pair of :mod:`oscar_compile.kv_tensor` (put in the module in the cache's place),
   each attention a :func:`~.rewrite.cache_step` on it (attend, then append once after the last reader),
   the model's own writes are erased.
3. :mod:`.backend` runs that inside a torch.compile backend (``backend="oscar"``) before Inductor;
   :class:`~.backend.OScaRInductorPass` is the Inductor ``CustomGraphPass`` (discovery and report on
   post-grad ATen graphs).
4. :mod:`.report` records what was rewritten or skipped and why, and the KV memory before/after.
"""

from .backend import OScaRBackend, OScaRInductorPass, default_backend, oscar_backend
from .report import OScaRReport, SiteRecord
from .rewrite import CacheRegistry, cache_step, rewrite_graph
from .sites import Site, find_attention_nodes, match_attention

__all__ = [
    "CacheRegistry",
    "OScaRBackend",
    "OScaRInductorPass",
    "OScaRReport",
    "Site",
    "SiteRecord",
    "cache_step",
    "default_backend",
    "find_attention_nodes",
    "match_attention",
    "oscar_backend",
    "rewrite_graph",
]
