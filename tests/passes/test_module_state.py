"""A compiled hand-written module owns its OScaR state (reliability rows 1-3 and 16).

After ``oscar.compile`` the module's cache attributes are the OScaR halves: reading them gives the
dequantized contents, ``state_dict`` saves those (a checkpoint any process loads), ``deepcopy`` and
``torch.save(model)`` give a copy that decodes exactly like the original.
"""

import copy
import io
import subprocess
import sys

import pytest
import torch

import oscar_compile as oscar
from oscar_compile import fake_quantize
from oscar_compile.kv_tensor import OScaRKeyCache, is_oscar_cache
from pass_helpers import CONFIG, decode_steps
from pass_models import Decoder

PROMPT, DECODE = 40, 3


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _run(model, steps):
    with torch.no_grad():
        return [model(x, pos) for x, pos in steps]


@pytest.fixture(scope="module")
def decoded():
    """(compiled model after a prompt and 2 decode steps, its eager twin with the same history, the steps)."""
    torch.manual_seed(0)
    model = Decoder(write="setitem").eval()
    eager = copy.deepcopy(model)
    steps = decode_steps(prompt=PROMPT, decode=DECODE)
    oscar.compile(model, CONFIG, fullgraph=True, dynamic=False)
    _run(model, steps[:-1])
    _run(eager, steps[:-1])
    return model, eager, steps


def test_reading_a_replaced_cache_gives_its_dequantized_contents(decoded):
    model, eager, _ = decoded
    # layer 0's keys/values come from the inputs alone; layer 1's decode tokens also from layer 0's (quantized)
    # attention, so its eager twin matches it on the prompt only
    for layer, twin, stored in zip(model.layers, eager.layers, (PROMPT + DECODE - 1, PROMPT)):
        k, v = layer.kv_cache.k_cache, layer.kv_cache.v_cache
        assert isinstance(k, OScaRKeyCache) and is_oscar_cache(v) and k.shape == twin.kv_cache.k_cache.shape
        hist_k, hist_v = twin.kv_cache.k_cache[:, :, :stored], twin.kv_cache.v_cache[:, :, :stored]
        want_k, want_v = fake_quantize(hist_k, hist_v, CONFIG)
        for got, want in ((k, want_k), (v, want_v)):
            plain = got.clone().dequantize() if is_oscar_cache(got.clone()) else got.clone()
            torch.testing.assert_close(plain[:, :, :stored], want, atol=1e-5, rtol=1e-5)
            assert not plain[:, :, PROMPT + DECODE - 1 :].any()  # never written
            torch.testing.assert_close(got[:, :, :stored].float(), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.sum(), plain.sum(), atol=1e-4, rtol=1e-5)


def test_state_dict_checkpoint_loads_in_a_new_process_and_keeps_every_weight(decoded, tmp_path):
    model, _, _ = decoded
    state = model.state_dict()
    assert all(type(t) is torch.Tensor for t in state.values())
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    code = (
        "import torch, sys; sd = torch.load(sys.argv[1], weights_only=True); "
        "print(len(sd), float(sd['layers.0.kv_cache.k_cache'].double().abs().sum()))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    n, total = done.stdout.split()
    assert int(n) == len(state)
    assert float(total) == pytest.approx(model.layers[0].kv_cache.k_cache.dequantize().double().abs().sum().item())
    fresh = Decoder(write="setitem")
    fresh.load_state_dict(torch.load(path, weights_only=True))  # strict: every key present, shapes equal
    for name, tensor in fresh.state_dict().items():
        if "cache" not in name:
            assert torch.equal(tensor, state[name]), name
    # loading a checkpoint into the compiled model keeps its OScaR state
    before = model.layers[0].kv_cache.k_cache.dequantize()
    model.load_state_dict(torch.load(path, weights_only=True))
    assert is_oscar_cache(model.layers[0].kv_cache.k_cache)
    assert torch.equal(model.layers[0].kv_cache.k_cache.dequantize(), before)


def test_deepcopy_mid_sequence_decodes_exactly_like_the_original(decoded):
    model, _, steps = decoded
    twin = copy.deepcopy(model)
    k, k2 = model.layers[0].kv_cache.k_cache, twin.layers[0].kv_cache.k_cache
    assert is_oscar_cache(k2) and k2.key_codes.data_ptr() != k.key_codes.data_ptr()  # its own state
    assert twin.oscar_report is twin._oscar_backend.report and twin._compiled_call_impl.model is twin
    x, pos = steps[-1]
    copied = _run(twin, [(x, pos)])[0]
    original = _run(model, [(x, pos)])[0]
    assert torch.equal(copied, original)
    assert torch.equal(k2.lengths, k.lengths) and int(k.lengths[0]) == PROMPT + DECODE


def test_torch_save_of_the_compiled_module_round_trips():
    torch.manual_seed(0)
    model = Decoder(write="index_copy_").eval()
    steps = decode_steps(prompt=PROMPT, decode=2, seed=3)
    oscar.compile(model, CONFIG, fullgraph=True, dynamic=False)
    _run(model, steps[:-1])
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded._compiled_call_impl.model is loaded and is_oscar_cache(loaded.layers[1].kv_cache.v_cache)
    x, pos = steps[-1]
    assert torch.equal(_run(loaded, [(x, pos)])[0], _run(model, [(x, pos)])[0])
