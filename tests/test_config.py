import dataclasses

import pytest

from oscar_compile import OScaRConfig


def test_defaults_and_presets():
    c = OScaRConfig()
    assert (c.bits, c.group_size, c.residual_length) == (2, 32, 128)
    assert c == OScaRConfig.adaptive() and (c.rotate_keys, c.rotate_values, c.token_scaling) == ("auto", True, True)
    p, k = OScaRConfig.paper(), OScaRConfig.kivi()
    assert (p.rotate_keys, p.rotate_values, p.token_scaling) == (True, True, True)
    assert (k.rotate_keys, k.rotate_values, k.token_scaling) == (False, False, False)
    assert OScaRConfig.kivi(bits=4).bits == 4
    four = c.replace(bits=4)
    assert four.bits == 4 and (four.rotate_keys, four.token_scaling) == (c.rotate_keys, c.token_scaling)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        OScaRConfig().bits = 4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bits": 1}, "bits"),
        ({"bits": 4.5}, "bits"),
        ({"bits": 8}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": 12}, "group_size"),
        ({"residual_length": 100}, "residual_length"),
        ({"residual_length": 0}, "residual_length"),
        ({"rotate_keys": "yes"}, "rotate_keys"),
        ({"token_scaling": 1}, "token_scaling"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"OScaRConfig.{field}"):
        OScaRConfig(**kwargs)


@pytest.mark.parametrize("residual", [32, 128])
def test_capacity_and_cache_format_are_derived_once(residual):
    config = OScaRConfig(residual_length=residual)
    assert [config.capacity(n) for n in (1, residual, residual + 1, 3 * residual)] == [residual, residual, 2 * residual, 3 * residual]
    fmt = config.cache_format
    assert (fmt.bits, fmt.group_size, fmt.residual_length, fmt.rotate_values) == (2, 32, residual, True)
