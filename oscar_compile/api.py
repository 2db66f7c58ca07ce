"""``oscar.compile(model)``: the one-line entry point (README, "oscar.compile").

What it does:

1. Hugging Face models: if the cache integration is available (``oscar_compile.hf_cache``), its hook makes
   the model use ``OScaRCache`` by default, so ``generate()`` writes into OScaR state from the start.
2. Compiles the model in place (like ``nn.Module.compile``: the same object is returned, so
   ``generate()`` and every attribute keep working) with the :class:`~oscar_compile.passes.OScaRBackend`:
   at each traced graph it discovers attention-with-KV-cache sites, swaps each rewritten cache for OScaR
   state (the full-precision buffer's storage is freed), rewrites writes + attention to the oscar ops and
   compiles with Inductor.
3. Attaches ``model.oscar_report`` (:class:`~oscar_compile.passes.OScaRReport`), filled when graphs are
   traced, i.e. at the first call.

Documented outcomes:

* no site: the model is compiled with plain Inductor semantics (nothing rewritten), the report says
  ``0 site(s) rewritten`` and lists every attention it saw with the reason it was left alone;
* compiled twice: the second call returns the model unchanged with a ``UserWarning`` (the caches are
  already OScaR state; compiling again would lose it);
* inference only: calls run under ``torch.no_grad()`` (the oscar ops have no backward).
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

from .config import OScaRConfig
from .passes import OScaRBackend, OScaRReport

__all__ = ["compile"]

_COMPILE_KEYS = {"fullgraph", "dynamic", "mode", "options", "disable"}


def _hf_hook():
    """The transformers integration's hook, or None while it is not available."""
    try:
        module = importlib.import_module("oscar_compile.hf_cache")
    except ImportError:
        return None
    for name in ("use_oscar_cache", "enable_oscar_cache", "install", "patch_model"):
        hook = getattr(module, name, None)
        if callable(hook):
            return hook
    return None


def _is_hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def compile(model: torch.nn.Module, config: OScaRConfig | None = None, **torch_compile_kwargs) -> torch.nn.Module:
    """Rewrite every attention-with-KV-cache site of ``model`` to OScaR and compile it with Inductor.

    Args:
        model: any ``nn.Module``; Hugging Face models keep ``generate()``.
        config: :class:`OScaRConfig` (default ``OScaRConfig()``).
        **torch_compile_kwargs: ``fullgraph``, ``dynamic``, ``mode``, ``options``, ``disable`` as for
            ``torch.compile`` (``mode``/``options`` go to Inductor; ``backend`` is not accepted).

    Returns ``model`` itself, compiled in place, with ``model.oscar_report``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"oscar.compile expects an nn.Module, got {type(model).__name__}")
    config = config or OScaRConfig()
    if not isinstance(config, OScaRConfig):
        raise TypeError(f"config must be an OScaRConfig, got {type(config).__name__}")
    unknown = set(torch_compile_kwargs) - _COMPILE_KEYS
    if unknown:
        raise ValueError(
            f"unsupported torch.compile arguments {sorted(unknown)}; accepted: {sorted(_COMPILE_KEYS)} "
            f"(the backend is always OScaR + Inductor)"
        )
    if isinstance(getattr(model, "oscar_report", None), OScaRReport):
        warnings.warn(
            "oscar.compile: model is already compiled with OScaR; returning it unchanged", UserWarning, stacklevel=2
        )
        return model

    report = OScaRReport(config)
    options = dict(torch_compile_kwargs.pop("options", None) or {})
    mode = torch_compile_kwargs.pop("mode", None)
    if mode is not None:
        options = {**torch._inductor.list_mode_options(mode), **options}
    backend = OScaRBackend(config, report=report, inductor_options=options)

    if _is_hf_model(model):
        hook = _hf_hook()
        if hook is not None:
            hook(model, config)

    compiled = torch.compile(model._call_impl, backend=backend, **torch_compile_kwargs)

    @functools.wraps(model._call_impl)
    def call(*args, **kwargs):
        with torch.no_grad():
            return compiled(*args, **kwargs)

    model._compiled_call_impl = call
    model.oscar_report = report
    model._oscar_backend = backend
    return model
