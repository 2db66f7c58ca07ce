import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oscar_compile.kernels import hadamard_block_size, hadamard_matrix, hadamard_transform
from testing_utils import head_dims, randn, seeds

ALL_DIMS = st.sampled_from((1, 2, 8, 16, 32, 64, 80, 96, 112, 128, 256))


@given(d=ALL_DIMS)
def test_matrix_is_symmetric_orthonormal_and_self_inverse(d):
    h = hadamard_matrix(d, torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    assert torch.allclose(h, h.T)
    assert torch.allclose(h @ h, eye, atol=1e-12)
    assert torch.allclose(h @ h.T, eye, atol=1e-12)


@given(d=ALL_DIMS)
def test_entries_are_plus_minus_inverse_sqrt_block(d):
    h = hadamard_matrix(d, torch.float64)
    block = hadamard_block_size(d)
    nonzero = h[h != 0].abs()
    assert torch.allclose(nonzero, torch.full_like(nonzero, 1 / math.sqrt(block)))
    # block-diagonal: exactly `block` nonzeros per row
    assert ((h != 0).sum(1) == block).all()


def test_block_size_is_largest_power_of_two_divisor():
    assert [hadamard_block_size(d) for d in (64, 80, 96, 112, 128, 256, 24)] == [64, 16, 32, 16, 128, 256, 8]
    with pytest.raises(ValueError, match="head_dim"):
        hadamard_block_size(0)


def test_sylvester_order_on_a_hand_worked_case():
    # H_4 = [[1,1,1,1],[1,-1,1,-1],[1,1,-1,-1],[1,-1,-1,1]] / 2
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(hadamard_transform(x), torch.tensor([10.0, -2.0, -4.0, 0.0]) / 2)


@given(d=ALL_DIMS, seed=seeds, lead=st.lists(st.integers(1, 3), min_size=0, max_size=3))
def test_fast_transform_equals_matrix_product(d, seed, lead):
    x = randn((*lead, d), seed=seed)
    expected = x.double() @ hadamard_matrix(d, torch.float64)
    assert torch.allclose(hadamard_transform(x).double(), expected, atol=1e-5)


@given(d=head_dims, seed=seeds)
def test_rotation_preserves_dot_products_and_is_self_inverse(d, seed):
    q, k = randn((5, d), seed=seed), randn((7, d), seed=seed + 1)
    assert torch.allclose(hadamard_transform(q) @ hadamard_transform(k).T, q @ k.T, atol=1e-4)
    assert torch.allclose(hadamard_transform(hadamard_transform(q)), q, atol=1e-5)


def test_output_is_fp32_for_low_precision_inputs():
    x = randn((3, 64), torch.bfloat16)
    assert hadamard_transform(x).dtype == torch.float32
