"""One torchrun rank of the tensor-parallel tests: ``torchrun --nproc-per-node 2 tests/tp_worker.py MODELS OUT``.

MODELS holds tiny models saved by ``tp_reference.save_tiny`` (one folder per architecture). Each rank loads
every model twice, whole (single process) and with ``tp_plan="auto"`` (gloo), runs the cases below and writes
its measurements to ``OUT/rank{r}.pt``; tests/test_tensor_parallel.py asserts on them. Nothing is asserted
here, so one failing property does not hide the others.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers as tf  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from oscar_compile import OScaRConfig, tensor_parallel  # noqa: E402
from oscar_compile.bit_budget import plan_layer_bits  # noqa: E402
from oscar_compile.hf_cache import OScaRCache, OScaRLayer, use_oscar_attention, use_oscar_cache  # noqa: E402
from tp_reference import ARCHS, RankGroupCache, chunk_ids, register_rank_group_attention, run_chunks  # noqa: E402

torch.set_num_threads(1)
PAPER = OScaRConfig.paper(residual_length=32)  # fixed flags, every switch on (the norm matters)
AUTO = OScaRConfig(residual_length=32)  # the default: "auto" key rotation, per kv head
KIVI_SCALE_OFF = OScaRConfig(rotate_keys=True, rotate_values=True, token_scaling=False, residual_length=32)
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
CACHE_KW = {"mistral": dict(quantize_sliding=True)}  # its sliding layers through OScaR (the default keeps them bf16)


class CountCollectives(TorchDispatchMode):
    """Counts c10d ops (in-place and functional collectives) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def load(path, tp: bool):
    kwargs = dict(tp_plan="auto") if tp else {}
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def oscar_model(model):
    use_oscar_attention(model)
    return model


def reference_model(model):
    model.set_attn_implementation(register_rank_group_attention())
    return model


def diffs(a, b) -> list[float]:
    return [float((x - y).abs().max()) for x, y in zip(a, b)]


def padded_batch(seed=3):
    """Two prompts of 70 and 50 tokens, left padded, then decode steps and a chunk."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 256, (2, 70), generator=gen)
    prompt[1, :20] = 0
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :20] = 0
    rest = [torch.randint(1, 256, (2, n), generator=gen) for n in (1, 1, 20, 1)]
    return [prompt, *rest], mask


def run_arch(arch: str, path: Path, world: int) -> dict:
    res: dict = {}
    kw = CACHE_KW.get(arch, {})
    sp, tp = load(path, False), load(path, True)
    cfg = tp.config
    res["tp_size"] = tp._tp_size
    res["local_kv_heads"] = tensor_parallel.tp_info(tp).kv_heads
    chunks = chunk_ids()

    # 1. bf16 (transformers' DynamicCache): TP vs single process, batch 1 and a left-padded batch
    res["bf16"] = diffs(run_chunks(tp, DynamicCache(config=cfg), chunks), run_chunks(sp, DynamicCache(config=cfg), chunks))
    pchunks, pmask = padded_batch()
    res["bf16_padded"] = diffs(run_chunks(tp, DynamicCache(config=cfg), pchunks, pmask),
                               run_chunks(sp, DynamicCache(config=cfg), pchunks, pmask))
    bf16_sp = run_chunks(sp, DynamicCache(config=cfg), chunks)

    # 2. OScaR: TP vs the single-process reference of W ranks (per-rank norm), and vs plain single process
    oscar_model(tp)
    for name, ocfg in (("paper", PAPER), ("auto", AUTO), ("scale_off", KIVI_SCALE_OFF)):
        cache = OScaRCache(cfg, 128, ocfg, **kw)
        got = run_chunks(tp, cache, chunks)
        ref_cache = RankGroupCache(cfg, 128, ocfg, world, **kw)
        ref = run_chunks(reference_model(sp), ref_cache, chunks)
        plain = run_chunks(oscar_model(sp), OScaRCache(cfg, 128, ocfg, **kw), chunks)
        res[f"oscar_{name}"] = diffs(got, ref)
        res[f"oscar_{name}_vs_single"] = diffs(got, plain)
        res[f"oscar_{name}_quant_effect"] = diffs(plain, bf16_sp)
        rank = dist.get_rank()
        res[f"flags_{name}"] = [
            (layer.keys.key_rotated.tolist(), layer.keys.key_scaled.tolist(),
             ref_cache.groups(i)[rank].keys.key_rotated.tolist(), ref_cache.groups(i)[rank].keys.key_scaled.tolist())
            for i, layer in enumerate(cache.layers) if isinstance(layer, OScaRLayer)
        ]
        res[f"lengths_{name}"] = [layer.keys.lengths.tolist() for layer in cache.layers]
        if name == "paper":  # per-rank bytes against the single-process cache of the same batch and length
            report = tensor_parallel.memory_report(cache, tp)
            single = OScaRCache(cfg, 128, ocfg, **kw)
            run_chunks(oscar_model(sp), single, chunks[:1])
            res["memory"] = dict(report, single_oscar_bytes=single.nbytes(), single_static_bytes=single.bf16_nbytes(),
                                 single_replicated_bytes=tensor_parallel.replicated_bytes(single))
            tensor_parallel.check_consistent(cache, tp)  # must not raise
            res["consistent_error"] = None
            odd = OScaRCache(cfg, 128 if dist.get_rank() == 0 else 256, ocfg, **kw)  # a rank that sized its cache differently
            run_chunks(tp, odd, chunks[:1])
            try:
                tensor_parallel.check_consistent(odd, tp)
            except RuntimeError as e:
                res["consistent_error"] = str(e)

    # 3. left-padded batch through OScaR (fixed flags: batch items independent)
    res["oscar_padded"] = diffs(run_chunks(tp, OScaRCache(cfg, 128, PAPER, **kw), pchunks, pmask),
                                run_chunks(reference_model(sp), RankGroupCache(cfg, 128, PAPER, world, **kw), pchunks, pmask))

    # 4. collectives in one decode step: the OScaR cache adds none to the model's own
    counts = {}
    for name, cache in (("bf16", DynamicCache(config=cfg)), ("oscar", OScaRCache(cfg, 128, PAPER, **kw))):
        with torch.no_grad():
            tp(chunks[0], cache=cache)
            with CountCollectives() as c:
                tp(chunks[1], cache=cache)
        counts[name] = c.counts
    res["collectives"] = counts

    # 5. generate: greedy and beam search, TP (use_oscar_cache: the oscar.compile hook) vs the reference
    prompt = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    hooked = not kw  # the oscar.compile hook (use_oscar_cache); an explicit cache where its defaults differ
    if hooked:
        use_oscar_cache(tp, PAPER)
    reference_model(sp)
    out = {}
    for name, gkw in (("greedy", dict(max_new_tokens=40)), ("beam", dict(max_new_tokens=24, num_beams=3))):
        length = prompt.shape[1] + gkw["max_new_tokens"]
        kept = None if hooked else OScaRCache(cfg, length, PAPER, **kw)
        got = tp.generate(prompt, **GEN, **gkw, **({} if hooked else {"cache": kept}))
        kept = tp.generate.cache if hooked else kept
        rows = gkw.get("num_beams", 1)
        ref = sp.generate(prompt, **GEN, **gkw, cache=RankGroupCache(cfg, length, PAPER, world, **kw))
        out[name] = (got.tolist(), ref.tolist())
        out[f"{name}_kv_heads"] = kept.oscar_layers[0].num_heads
        out[f"{name}_rows"] = (kept.oscar_layers[0].batch_size, rows)
    out["hooked"] = hooked
    res["generate"] = out

    # 6. a bits budget: each rank scores only its own kv heads; the allocation must be the same on every rank
    sp_plan = plan_layer_bits(sp, prompt, OScaRConfig(bits=3.0))
    res["budget"] = dict(tp=plan_layer_bits(tp, prompt, OScaRConfig(bits=3.0)).layer_bits, single=sp_plan.layer_bits)
    return res


def main():
    models, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world": world, "seconds": {}}
    for arch in ARCHS:
        t0 = time.perf_counter()
        results[arch] = run_arch(arch, models / arch, world)
        results["seconds"][arch] = time.perf_counter() - t0
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
