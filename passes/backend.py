"""Entry points into torch.compile: the ``"oscar"`` Dynamo backend and an Inductor ``CustomGraphPass``.

The rewrite runs on the Dynamo graph (torch IR), where cache buffers are graph inputs whose real tensors
the backend receives: that is where a cache can be replaced by its OScaR halves. The post-grad Inductor
pass (:class:`OScaRInductorPass`) sees only the functionalized ATen graph; it discovers and reports sites
there (aten SDPA variants, functional ``index_put``/``index_copy`` writes) but cannot replace a module's
cache, so it does not rewrite.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..config import OScaRConfig
from .report import OScaRReport, SiteRecord
from .rewrite import CacheRegistry, rewrite_graph, site_name
from .sites import find_attention_nodes, match_attention

__all__ = ["OScaRBackend", "OScaRInductorPass", "oscar_backend", "default_backend"]


class OScaRBackend:
    """A torch.compile backend: rewrite the Dynamo graph's KV-cache attention, then compile with Inductor.

    Args:
        config: :class:`OScaRConfig` (defaults to ``OScaRConfig()``).
        report: where matches and skips are recorded (a fresh :class:`OScaRReport` by default).
        inductor_options: Inductor config patches (what ``torch.compile(options=..., mode=...)`` would set).
        compiler: what compiles the rewritten graph: ``"inductor"`` (default, with ``inductor_options``), or
            any other ``torch.compile`` backend, by name or as a callable ``(gm, example_inputs) -> callable``.
            For debugging: ``"eager"`` runs the rewritten graph as is and ``"aot_eager"`` adds AOT tracing
            without Inductor, which tells a rewrite problem from an Inductor one; a callable also sees the
            rewritten ``GraphModule`` (``gm.code``) of every graph.

    A graph that replaces full-precision caches by OScaR halves (:mod:`.rewrite`) reads the halves from the
    GraphModule; they take the caches' place in their modules right after that graph's first run, so
    every later trace sees the halves as the module's own attributes.
    """

    def __init__(self, config=None, report=None, inductor_options=None, compiler="inductor"):
        self.config = OScaRConfig() if config is None else config
        if not isinstance(self.config, OScaRConfig):
            raise TypeError(f"config must be an OScaRConfig, got {type(self.config).__name__}")
        if not (callable(compiler) or compiler in torch._dynamo.list_backends(exclude_tags=())):
            raise ValueError(
                "compiler must be 'inductor', another torch.compile backend's name (torch._dynamo.list_backends()) "
                f"or a callable (gm, example_inputs) -> callable, got {compiler!r}"
            )
        self.report = report if report is not None else OScaRReport(self.config)
        self.registry = CacheRegistry(self.config)
        self.inductor_options = dict(inductor_options or {})
        self.compiler = compiler

    def __reduce__(self):  # a copy (deepcopy, pickle) starts with no caches of its own yet
        return (OScaRBackend, (self.config, self.report, self.inductor_options, self.compiler))

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> Callable:
        swaps = rewrite_graph(gm, example_inputs, self.registry, self.report)
        if self.compiler == "inductor":
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(gm, example_inputs, config_patches=self.inductor_options or None)
        else:
            compiler = self.compiler if callable(self.compiler) else torch._dynamo.lookup_backend(self.compiler)
            compiled = compiler(gm, example_inputs)
        if not swaps:
            return compiled
        return _swap_after_first_run(compiled, swaps)


def _swap_after_first_run(compiled: Callable, swaps) -> Callable:
    """``compiled``, which puts the OScaR halves in their modules once it has run (or failed) the first time.

    Not before: the call in progress fetches its inputs (the full-precision caches) after compiling.
    """
    pending = list(swaps)

    def run(*args):
        try:
            return compiled(*args)
        finally:
            while pending:
                pending.pop().apply()

    return run


_DEFAULT: dict[str, OScaRBackend] = {}


def default_backend(config=None) -> OScaRBackend:
    """The shared backend behind ``backend="oscar"`` for ``config`` (its ``.report`` says what it did)."""
    config = config or OScaRConfig()
    return _DEFAULT.setdefault(repr(config), OScaRBackend(config))


@torch._dynamo.register_backend(name="oscar")
def oscar_backend(gm, example_inputs, options=None, mode=None):
    """``torch.compile(model, backend="oscar", options={"oscar_config": OScaRConfig(...), **inductor})``."""
    options = dict(options or {})
    config = options.pop("oscar_config", None)
    backend = default_backend(config)
    if mode is not None:
        options = {**torch._inductor.list_mode_options(mode), **options}
    backend.inductor_options = options
    return backend(gm, example_inputs)


def _pass_sources_hash() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


class OScaRInductorPass(CustomGraphPass):
    """Inductor post-grad pass: discover attention-with-KV-cache sites in the ATen graph and report them.

    Register with ``torch._inductor.config.patch(post_grad_custom_post_pass=OScaRInductorPass(config))``.
    ``uuid()`` hashes this package's sources plus ``repr(config)`` so cached graphs go stale when either
    changes. Sites found here are recorded in ``report.found`` (and ``self.found`` with their Site) or
    ``report.skipped``; the rewrite itself needs the Dynamo-level backend (see module docstring).
    """

    def __init__(self, config=None, report=None):
        self.config = config or OScaRConfig()
        self.report = report if report is not None else OScaRReport(self.config)
        self.found = []  # (site name, Site) matched on ATen graphs

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.report.graphs += 1
        values = {}
        for n in graph.nodes:
            if n.op == "placeholder":
                values[n] = n.meta.get("val")
        for node in find_attention_nodes(graph):
            site = match_attention(node, values, self.config.group_size, check_values=False)
            name = site_name(node)
            if isinstance(site, str):
                self.report.add_skipped(name, site)
            else:
                self.found.append((name, site))
                self.report.found.append(
                    SiteRecord(name, site.kind, f"{site.key_cache.name}/{site.value_cache.name}", site.heads,
                               site.kv_heads, site.head_dim, site.mask_kind, site.write_op)  # fmt: skip
                )

    def uuid(self):
        return hashlib.sha256((_pass_sources_hash() + repr(self.config)).encode()).hexdigest()
