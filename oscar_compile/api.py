"""``oscar.compile(model)``: the one-line entry point (README, "oscar.compile").

What it does:

1. Hugging Face models: ``oscar_compile.hf_cache.use_oscar_cache`` makes the model use ``OScaRCache`` by
   default, so ``generate()`` writes into OScaR state from the start; a model that cannot take one
   (``hf_unsupported_reason``: encoder-decoder, attention outside transformers' interface, ALiBi, ...)
   keeps transformers' caches and the report says why.
2. Compiles the model in place (like ``nn.Module.compile``: the same object is returned, so
   ``generate()`` and every attribute keep working) with the :class:`~oscar_compile.passes.OScaRBackend`:
   at each traced graph it discovers attention-with-KV-cache sites, puts OScaR state (the cache tensor
   subclass of :mod:`oscar_compile.kv_tensor`) in each rewritten cache's place in its module, rewrites
   writes + attention to the oscar ops and compiles with Inductor.
3. Attaches ``model.oscar_report`` (:class:`~oscar_compile.passes.OScaRReport`), filled when graphs are
   traced, i.e. at the first call.

Documented outcomes:

* no site: the model is compiled with plain Inductor semantics (nothing rewritten), the report says
  ``0 site(s) rewritten`` and lists every attention it saw with the reason it was left alone;
* compiled twice: the second call returns the model unchanged with a ``UserWarning`` (the caches are
  already OScaR state; compiling again would lose it);
* inference only: calls run under ``torch.no_grad()`` (the oscar ops have no backward);
* the model owns its state: a replaced cache attribute reads as its dequantized contents, ``state_dict()``
  saves it dequantized (a plain tensor of the buffer's shape and dtype; loading a checkpoint into the
  compiled model keeps the cache's OScaR state), ``copy.deepcopy`` copies it, ``torch.save(model)`` works.
"""

from __future__ import annotations

import warnings

import torch

from .config import OScaRConfig
from .passes import OScaRBackend, OScaRReport

__all__ = ["compile"]

_COMPILE_KEYS = {"fullgraph", "dynamic", "mode", "options", "disable"}


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
    config = OScaRConfig() if config is None else config
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

    options = dict(torch_compile_kwargs.pop("options", None) or {})
    mode = torch_compile_kwargs.pop("mode", None)
    if mode is not None:
        options = {**torch._inductor.list_mode_options(mode), **options}
    backend = OScaRBackend(config, report=OScaRReport(config), inductor_options=options)

    if _is_hf_model(model):
        from .hf_cache import hf_unsupported_reason, use_oscar_cache

        reason = hf_unsupported_reason(model, config)
        if reason is None:
            use_oscar_cache(model, config)
        else:  # the model keeps transformers' caches; the graph pass still sees (and reports) its attention
            backend.report.add_skipped(f"{type(model).__name__} (OScaRCache)", reason)

    model._oscar_compiled = CompiledCall(model, backend, torch_compile_kwargs)
    model.oscar_report = backend.report
    model._oscar_backend = backend
    return model


class CompiledCall:
    """``model._compiled_call_impl`` of a model given to ``oscar.compile``: ``model._call_impl`` compiled with
    the OScaR backend (at the first call), run under ``torch.no_grad()``.

    Held as ``model._oscar_compiled``, it installs itself as ``model._compiled_call_impl``, which
    ``nn.Module`` drops when a module is copied or pickled: a copy of the model gets its own again when this
    object is rebuilt with it. So ``copy.deepcopy(model)`` compiles the copy afresh (its caches, OScaR
    halves included, are copied by deepcopy, so the copy decodes exactly like the original), and
    ``torch.save(model)`` / ``pickle`` store the model, backend settings and compile arguments, not code.
    """

    def __init__(self, model: torch.nn.Module, backend: OScaRBackend, compile_kwargs: dict):
        self.model = model
        self.backend = backend
        self.compile_kwargs = dict(compile_kwargs)
        self._compiled = None
        # object.__setattr__: while unpickling, the module's __dict__ may not be filled in yet
        object.__setattr__(model, "_compiled_call_impl", self)

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            self._compiled = torch.compile(self.model._call_impl, backend=self.backend, **self.compile_kwargs)
        with torch.no_grad():
            return self._compiled(*args, **kwargs)

    def __reduce__(self):
        return (CompiledCall, (self.model, self.backend, self.compile_kwargs))
