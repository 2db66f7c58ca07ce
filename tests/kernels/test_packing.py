import itertools
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oscar_compile.kernels import codes_per_byte, pack_codes, unpack_codes
from testing_utils import bits


@given(b=bits, dim=st.integers(0, 3), seed=st.integers(0, 1000))
def test_round_trip_is_exact(b, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = [2, 3, 5, 7]
    shape[dim] = 8 * (1 + seed % 3)
    codes = torch.randint(0, 1 << b, shape, generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, b, dim)
    expect = list(shape)
    expect[dim] //= codes_per_byte(b)
    assert packed.dtype == torch.uint8 and list(packed.shape) == expect
    assert torch.equal(unpack_codes(packed, b, dim), codes)


@pytest.mark.parametrize("b", [2, 4])
def test_every_code_combination_in_a_byte_round_trips(b):
    per = codes_per_byte(b)
    combos = torch.tensor(list(itertools.product(range(1 << b), repeat=per)), dtype=torch.uint8)
    packed = pack_codes(combos, b, dim=1)
    assert packed.shape == (len(combos), 1)
    # every byte value appears exactly once: the layout is a bijection
    assert sorted(packed.flatten().tolist()) == list(range(256))
    assert torch.equal(unpack_codes(packed, b, dim=1), combos)


def test_documented_bit_order():
    codes = torch.tensor([1, 2, 3, 0], dtype=torch.uint8)
    assert pack_codes(codes, 2, 0).item() == 1 | 2 << 2 | 3 << 4
    assert pack_codes(torch.tensor([5, 10], dtype=torch.uint8), 4, 0).item() == 5 | 10 << 4


@given(b=bits, dim=st.integers(0, 3), seed=st.integers(0, 1000))
def test_bit_planes_are_the_codes_of_every_per_byte_th_element(b, dim, seed):
    # unpack_plane(i): the codes of elements per_byte * j + i; the planes interleaved along dim are unpack_codes
    from oscar_compile.kernels.packing import unpack_plane

    gen = torch.Generator().manual_seed(seed)
    shape = [2, 3, 5, 7]
    shape[dim] = 1 + seed % 5
    packed = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    planes = [unpack_plane(packed, b, i) for i in range(codes_per_byte(b))]
    assert all(p.dtype == torch.uint8 and p.shape == packed.shape for p in planes)
    assert torch.equal(torch.stack(planes, dim + 1).flatten(dim, dim + 1), unpack_codes(packed, b, dim))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 3, 0)
    with pytest.raises(TypeError, match="uint8"):
        pack_codes(torch.zeros(8, dtype=torch.int32), 2, 0)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_codes(torch.zeros(6, dtype=torch.uint8), 2, 0)
    with pytest.raises(TypeError, match="uint8"):
        unpack_codes(torch.zeros(8, dtype=torch.float32), 2, 0)
    from oscar_compile.kernels.packing import unpack_plane

    with pytest.raises(TypeError, match="uint8"):
        unpack_plane(torch.zeros(8, dtype=torch.int32), 2, 0)
    with pytest.raises(ValueError, match="bit field 4"):
        unpack_plane(torch.zeros(8, dtype=torch.uint8), 2, 4)


@pytest.mark.parametrize("b", [2, 4])
def test_fp16_field_expansion_of_every_byte_is_exact(b):
    # the constants behind the kernels' inline-PTX code expansion (kernels/triton_utils._code_asm):
    # a half holding byte x reads, after (half & mask) | magic, as offset + (field of x), in fp16
    from oscar_compile.kernels.triton_utils import field_expansion

    byte = torch.arange(256, dtype=torch.int32)
    fields = unpack_codes(byte.to(torch.uint8).view(256, 1), b, dim=1).int()  # [256, 8 // b]
    for field in range(codes_per_byte(b)):
        mask, magic, offset = field_expansion(b, field)
        half = ((byte & mask) | magic).to(torch.int16).view(torch.float16)
        assert torch.equal(half - torch.tensor(offset, dtype=torch.float16), fields[:, field].half())


@pytest.mark.skipif(
    not (os.environ.get("OSCAR_TEST_CUDA") and torch.cuda.is_available()),
    reason="inline PTX runs on the GPU only (OSCAR_TEST_CUDA=1); its constants are checked above on CPU",
)
@pytest.mark.parametrize("b", [2, 4])
def test_inline_ptx_expansion_matches_unpack_codes(b):
    import triton
    import triton.language as tl

    from oscar_compile.kernels.triton_utils import _codes_f16

    @triton.jit
    def expand(src, dst, BITS: tl.constexpr, FIELD: tl.constexpr):
        offs = tl.arange(0, 256)
        tl.store(dst + offs, _codes_f16(tl.load(src + offs), BITS, FIELD, True))

    byte = torch.arange(256, dtype=torch.uint8, device="cuda")
    fields = unpack_codes(byte.view(256, 1), b, dim=1)
    for field in range(codes_per_byte(b)):
        out = torch.empty(256, dtype=torch.float16, device="cuda")
        expand[(1,)](byte, out, b, field)
        assert torch.equal(out, fields[:, field].half())
