"""Building blocks: aggregation arithmetic, preprocessing, names, safetensors checks."""

import numpy as np
import pandas as pd
import pytest

from fedcli.aggregation.rules import WeightedMean, add_cast
from fedcli.bank.tables import prepare
from fedcli.errors import FedcliError, VerificationError
from fedcli.metrics import score
from fedcli.names import check_key, check_name
from fedcli.protocol import tensors
from fedcli.protocol.spec import CategoricalFeature, DataSpec, NumericFeature


def test_fedavg_is_the_weighted_mean():
    avg = WeightedMean()
    avg.add({"w": np.array([1.0, 2.0], np.float32), "b": np.array([3.0], np.float32)}, 1)
    avg.add({"w": np.array([4.0, -2.0], np.float32), "b": np.array([0.0], np.float32)}, 3)
    mean = avg.result()
    np.testing.assert_allclose(mean["w"], [(1 + 12) / 4, (2 - 6) / 4])
    np.testing.assert_allclose(mean["b"], [3 / 4])
    new = add_cast(np.array([10, 10], np.float32), mean["w"])
    assert new.dtype == np.float32
    np.testing.assert_allclose(new, [13.25, 9.0])


def test_preprocessing_fills_missing_and_unknown_identically():
    spec = DataSpec(
        target="y",
        positive="bad",
        numeric=(NumericFeature("x", mean=10.0, std=2.0),),
        categorical=(CategoricalFeature("c", ("a", "b")),),
    )
    df = pd.DataFrame({"x": [12, None, "oops", 8], "c": ["a", "b", None, "zzz"], "y": ["bad", "good", "bad", None]})
    p = prepare(df, spec, "t.csv")
    assert p.rows_dropped == 1
    np.testing.assert_allclose(p.X, [[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_allclose(p.y, [1, 0, 1])
    assert p.filled == {"x": 2} and p.unknown == {"c": 1}
    with pytest.raises(FedcliError, match="lacks the target"):
        prepare(df.drop(columns=["y"]), spec, "t.csv")
    assert prepare(df.drop(columns=["y"]), spec, "t.csv", need_target=False).y is None


def test_names_and_keys_cannot_escape():
    for bad in ("../x", "A", "", "a/b", "-x", "x" * 64):
        with pytest.raises(FedcliError):
            check_name(bad)
    for bad in ("../x", "/etc/passwd", "a//b", "a/./b", "rounds/../../x"):
        with pytest.raises(FedcliError):
            check_key(bad)
    assert check_key("rounds/000001/updates/bank-a.json")


def test_decode_checks_sizes_before_parsing():
    good = tensors.encode({"w": np.zeros(3, np.float32)})
    assert tensors.decode(good, {"w": (3,)}, "x")["w"].shape == (3,)
    with pytest.raises(VerificationError, match="truncated"):
        tensors.decode(good[:4], {"w": (3,)}, "x")
    with pytest.raises(VerificationError, match="larger than the model"):
        tensors.decode(good + b"\0" * (1 << 21), {"w": (3,)}, "x")
    with pytest.raises(VerificationError, match="not a valid safetensors"):
        tensors.decode(good[:-4], {"w": (3,)}, "x")


def test_scores_on_known_values():
    y = np.array([0, 0, 1, 1])
    m = score(y, np.array([0.1, 0.4, 0.35, 0.8]))
    assert m["auc"] == pytest.approx(0.75)
    assert m["ks"] == pytest.approx(0.5)
    assert np.isnan(score(np.array([1, 1]), np.array([0.2, 0.3]))["auc"])
