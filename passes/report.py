"""What the pass did: rewritten sites, skipped sites with reasons, KV memory before and after."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["OScaRReport", "SiteRecord"]


@dataclass
class SiteRecord:
    """One attention site as seen in some graph (a site appears once per traced graph shape)."""

    name: str
    kind: str  # "sdpa" / "decomposed"
    cache: str  # key/value cache names
    heads: int
    kv_heads: int
    head_dim: int
    mask_kind: str
    write_op: str


@dataclass
class OScaRReport:
    """Filled by the pass as graphs are traced (``oscar.compile`` traces at the first call).

    Fields:
        rewritten: number of distinct attention sites rewritten to the OScaR ops.
        skipped: ``(site name, reason)`` for every attention site left untouched (deduplicated).
        kv_bytes_bf16: bytes of the full-precision caches that were replaced, at their maximum length.
        kv_bytes_oscar: bytes of the OScaR state replacing them, at the same maximum length.
        kv_slots: key/value element slots that state allocates (capacity: whole residual blocks), so
            ``8 * kv_bytes_oscar / kv_slots`` is the exact bits per element held; ``cache_bits``: each cache's
            code width (2 or 4; a bits budget mixes them).
        graphs: graphs the pass has seen; ``op_counts``: oscar ops inserted, over all graphs.
    """

    config: object = None
    sites: dict = field(default_factory=dict)  # name -> SiteRecord (rewritten)
    skipped: list = field(default_factory=list)
    kv_bytes_bf16: int = 0
    kv_bytes_oscar: int = 0
    graphs: int = 0
    op_counts: Counter = field(default_factory=Counter)
    caches: dict = field(default_factory=dict)  # cache name -> (bf16 bytes, oscar bytes)
    found: list = field(default_factory=list)  # SiteRecords matched but not rewritten (ATen discovery pass)
    kv_slots: int = 0
    cache_bits: dict = field(default_factory=dict)  # cache name -> code bits

    @property
    def rewritten(self) -> int:
        return len(self.sites)

    def add_rewritten(self, record: SiteRecord) -> None:
        self.sites.setdefault(record.name, record)

    def add_skipped(self, name: str, reason: str) -> None:
        if (name, reason) not in self.skipped and name not in self.sites:
            self.skipped.append((name, reason))

    def add_cache(self, name: str, bf16_bytes: int, oscar_bytes: int, slots: int = 0, bits=None) -> None:
        if name not in self.caches:
            self.caches[name] = (bf16_bytes, oscar_bytes)
            self.kv_bytes_bf16 += bf16_bytes
            self.kv_bytes_oscar += oscar_bytes
            self.kv_slots += slots
            if bits is not None:
                self.cache_bits[name] = bits

    def __str__(self) -> str:
        lines = [f"OScaR compile report: {self.rewritten} site(s) rewritten, {len(self.skipped)} skipped, "
                 f"{self.graphs} graph(s) traced"]  # fmt: skip
        if self.graphs == 0:
            lines.append("  (nothing traced yet: sites are discovered at the model's first call)")
        if self.config is not None:
            lines.append(f"  config: {self.config!r}")
            if getattr(self.config, "adaptive_keys", False):
                lines.append("  key flags: 'auto', chosen per kv head from each sequence's first step (prompt) keys "
                             "and queries, fixed while the sequence lasts")  # fmt: skip
        for rec in self.sites.values():
            lines.append(
                f"  rewritten {rec.name}: {rec.kind}, {rec.heads} heads / {rec.kv_heads} kv heads, "
                f"head_dim {rec.head_dim}, mask {rec.mask_kind}, write {rec.write_op}, cache {rec.cache}"
            )
        for rec in self.found:
            lines.append(
                f"  found {rec.name} (discovery only): {rec.kind}, {rec.heads} heads / {rec.kv_heads} kv heads, "
                f"head_dim {rec.head_dim}, mask {rec.mask_kind}, write {rec.write_op}"
            )
        for name, reason in self.skipped:
            lines.append(f"  skipped {name}: {reason}")
        if self.kv_bytes_bf16:
            ours = max(self.kv_bytes_oscar, 1)
            if self.kv_bytes_bf16 >= ours:
                size = f"{self.kv_bytes_bf16 / ours:.2f}x smaller"
            else:  # short caches: the full-precision residual window and per-group scales outweigh the codes
                size = f"{ours / self.kv_bytes_bf16:.2f}x larger"
            held = ""
            if self.kv_slots:
                held = f"; {8 * self.kv_bytes_oscar / self.kv_slots:.2f} bits per element held"
            if self.cache_bits:
                bits = list(self.cache_bits.values())
                held += f", code bits {sum(bits) / len(bits):.3g}" + (
                    f" (4 in {bits.count(4)} of {len(bits)} layers)" if len(set(bits)) > 1 else "")
            lines.append(
                f"  KV cache: {self.kv_bytes_bf16:,} B full precision -> {self.kv_bytes_oscar:,} B OScaR ({size}{held})"
            )
        return "\n".join(lines)
