"""`check_keys`: every config's ``from_dict`` rejects a non-mapping and unknown keys with the same
one-line messages, naming the class, the unknown keys and the known ones."""

from __future__ import annotations

import pytest

from quanta import QuantConfig
from quanta.core import QuantSpec
from quanta.core.dicts import check_keys, field_names
from quanta.nn import LayerQuantConfig, QuantDescriptor

CLASSES = [QuantSpec, QuantDescriptor, LayerQuantConfig, QuantConfig]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_unknown_keys_are_named_with_the_known_ones(cls):
    with pytest.raises(ValueError) as err:
        cls.from_dict({"colour": 1, "bits_": 2})
    known = sorted(field_names(cls))
    assert str(err.value) == f"{cls.__name__}.from_dict: unknown field(s) ['bits_', 'colour']; known: {known}"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("data", [[1, 2], "int8", None], ids=["list", "str", "none"])
def test_a_non_mapping_is_a_type_error(cls, data):
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\.from_dict expects a dict, got {type(data).__name__}$"):
        cls.from_dict(data)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_to_dict_writes_every_field_from_dict_reads(cls):
    obj = cls()
    assert set(obj.to_dict()) <= set(field_names(cls))
    assert cls.from_dict(obj.to_dict()) == obj


def test_check_keys_passes_a_known_mapping_through():
    data = {"a": 1}
    assert check_keys("X", data, ("a", "b")) is data
    with pytest.raises(ValueError, match=r"^X\.from_dict: unknown field\(s\) \[1\]; known: \['a'\]$"):
        check_keys("X", {1: 2}, ("a",))
