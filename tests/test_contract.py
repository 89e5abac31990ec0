"""fedcli/contract.py: the bounded readers and the one-line description of a broken contract."""

import pytest
from pydantic import BaseModel

from fedcli.contract import load_json, load_toml, nesting_depth, strict_config, validate
from fedcli.errors import ContractError, FedcliError, InputError


class Doc(BaseModel):
    model_config = strict_config()
    count: int | str = 1
    epochs: int = 1


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"int": None}, "unknown key 'int'"),  # found by bench/fuzz.py: a key named like a union member
        ({"str": 1}, "unknown key 'str'"),
        ({"epoch": 3}, "unknown key 'epoch'; did you mean 'epochs'?"),
        ({"count": 1.5}, "'count' input should be a valid integer (got 1.5)"),
        ({"epochs": float("nan")}, "'epochs'"),
    ],
)
def test_a_broken_contract_is_one_line_naming_the_field(raw, expected):
    with pytest.raises(ContractError) as info:
        validate(Doc, raw, "doc")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_depth_is_bounded_before_parsing():
    deep = b"[" * 5000 + b"]" * 5000
    assert nesting_depth(deep) == 5000
    assert nesting_depth(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[["}') == 1  # brackets inside strings do not count
    with pytest.raises(ContractError) as info:
        load_json(deep, "doc", 1 << 20)
    assert info.value.reason == "too-deep"
    with pytest.raises(InputError) as info:
        load_toml(b"a = " + b"[" * 3000 + b"]" * 3000, "spec", 1 << 20)
    assert info.value.reason == "too-deep"


def test_size_is_bounded_and_non_finite_json_refused():
    with pytest.raises(ContractError) as info:
        load_json(b"{}" + b" " * 100, "doc", 10)
    assert info.value.reason == "oversize"
    for text in (b'{"a": NaN}', b'{"a": Infinity}'):
        with pytest.raises(FedcliError):
            load_json(text, "doc", 100)
