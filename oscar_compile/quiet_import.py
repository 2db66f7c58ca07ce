"""torchao without its import-time noise (the only third-party package we import that makes any).

Two known, harmless kinds of log line, printed on every ``import oscar_compile`` otherwise:

* on a machine without torchao's CUDA extensions, torchao logs "Failed to load ..._C_*.so" for each one
  while it is imported: its logger is raised to ERROR for the duration of that one import;
* torchao registers its Enums with ``torch.utils._pytree.register_constant`` (in modules it imports
  lazily, some during tracing), for which torch logs a deprecation warning per Enum: a filter on torch's
  pytree logger drops exactly that message, and only for classes defined in torchao.

The user's own logging and warnings are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import sys

__all__ = ["quiet_torchao_import"]


class _TorchaoEnumConstantFilter(logging.Filter):
    """Drops torch's "Enum subclass ... register_constant() ... deprecated" warning for torchao's Enums."""

    def filter(self, record: logging.LogRecord) -> bool:
        cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
        from_torchao = getattr(cls, "__module__", "").startswith("torchao")
        return not (from_torchao and "register_constant()" in str(record.msg))


_PYTREE_FILTER = _TorchaoEnumConstantFilter()


@contextlib.contextmanager
def quiet_torchao_import():
    """Context for ``import torchao...``: its known import-time log lines are dropped."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    if _PYTREE_FILTER not in pytree_log.filters:
        pytree_log.addFilter(_PYTREE_FILTER)
    if "torchao" in sys.modules:  # already imported (by the user or earlier): nothing more will be printed
        yield
        return
    torchao_log = logging.getLogger("torchao")
    level = torchao_log.level
    torchao_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        torchao_log.setLevel(level)
