"""The fast paths stay exact: streamed reads, zero-copy decoding, chunked float64 sums, torch-free shapes."""

import json

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from fedcli import digest
from fedcli.aggregation.rules import CHUNK, WeightedMean, add_cast
from fedcli.errors import FedcliError, StoreError, VerificationError
from fedcli.models import build, shapes
from fedcli.protocol import rounds
from fedcli.protocol.spec import ModelSpec
from fedcli.protocol.tensors import decode, encode, max_file_size
from fedcli.store.folder import FolderStore


def test_model_shapes_match_torch_without_torch():
    for spec in (ModelSpec("logreg"), ModelSpec("mlp", (16,)), ModelSpec("mlp", (5, 7, 3))):
        built = {k: tuple(v.shape) for k, v in build(spec, 25).state_dict().items()}
        assert list(shapes(spec, 25).items()) == list(built.items())


def test_chunked_fedavg_equals_float64_reference():
    rng = np.random.default_rng(1)
    shp = {"w": (3, CHUNK + 17), "b": (5,)}
    deltas = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shp.items()} for _ in range(3)]
    weights = [10, 3, 250]
    avg = WeightedMean()
    for d, w in zip(deltas, weights, strict=True):
        avg.add({k: v.copy() for k, v in d.items()}, w)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shp.items()}
    got = {k: add_cast(base[k], avg.result()[k]) for k in base}
    for k in shp:
        ref = sum(d[k].astype(np.float64) * w for d, w in zip(deltas, weights, strict=True)) / sum(weights)
        np.testing.assert_array_equal(avg.result()[k], ref)
        np.testing.assert_array_equal(got[k], (base[k].astype(np.float64) + ref).astype(np.float32))
    with pytest.raises(FedcliError):
        avg.add(deltas[0], 1)


def _raw(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + body


def test_zero_copy_decode_matches_safetensors_and_refuses_bad_layouts():
    rng = np.random.default_rng(2)
    tensors = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    data = encode(tensors)
    got, ref = decode(data, {"a": (4, 3), "b": (5,)}, "x"), st_load(data)
    for k in tensors:
        np.testing.assert_array_equal(got[k], ref[k])
    shp = {"a": (2,), "b": (2,)}
    body = np.arange(4, dtype=np.float32).tobytes()
    ok = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    assert decode(_raw(ok, body), shp, "x")["b"].tolist() == [2.0, 3.0]
    bad = [
        {**ok, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},  # overlap
        {**ok, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 12]}},  # length != shape
        {
            **ok,
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        },
        {**ok, "a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
        {**ok, "a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}},
        {**ok, "a": {"dtype": "F32", "shape": [2], "data_offsets": [False, 8]}},  # bool is not an offset
        ["not", "a", "table"],
    ]
    for header in bad:
        with pytest.raises(VerificationError, match="not a valid safetensors"):
            decode(_raw(header, body), shp, "x")
    with pytest.raises(VerificationError, match="not a valid safetensors"):
        decode(_raw(ok, body + b"\0\0\0\0"), shp, "x")  # trailing bytes
    with pytest.raises(VerificationError, match="dtype"):
        decode(_raw({k: {**v, "dtype": "I32"} for k, v in ok.items()}, body), shp, "x")


def test_streamed_read_hashes_and_reuses_the_buffer(tmp_path):
    store = FolderStore(tmp_path)
    shp = {"w": (1000,)}
    one, two = (encode({"w": np.full(1000, v, np.float32)}) for v in (1.0, 2.0))
    store.put("u/one.safetensors", one)
    store.put("u/two.safetensors", two)
    buf = bytearray(max_file_size(shp))
    a = rounds.read_tensors(store, "u/one.safetensors", digest.sha256(one), shp, "one", buffer=buf)
    assert a["w"][0] == 1.0
    b = rounds.read_tensors(store, "u/two.safetensors", digest.sha256(two), shp, "two", buffer=buf)
    assert b["w"][0] == 2.0 and a["w"][0] == 2.0  # views into the same reused buffer
    with pytest.raises(VerificationError, match="sha256"):
        rounds.read_tensors(store, "u/two.safetensors", digest.sha256(one), shp, "two")
    with pytest.raises(StoreError, match="larger than expected"):
        list(store.read_into("u/two.safetensors", memoryview(bytearray(len(two) - 1))))
    # the folder store really streams (chunk by chunk into the caller's buffer)
    chunks = list(store.read_into("u/two.safetensors", memoryview(buf), chunk=1000))
    assert len(chunks) == -(-len(two) // 1000) and bytes(buf[: len(two)]) == two


def test_weighted_mean_chunked_equals_float64_reference():
    rng = np.random.default_rng(3)
    deltas = [{"w": rng.standard_normal((2, CHUNK + 5)).astype(np.float32)} for _ in range(3)]
    mean = WeightedMean()
    for d, (w, s) in zip(deltas, [(5, 1.0), (2, 0.5), (9, 1.0)], strict=True):
        mean.add(d, w, scale=s)
    ref = (
        deltas[0]["w"].astype(np.float64) * 5
        + deltas[1]["w"].astype(np.float64) * 1.0
        + deltas[2]["w"].astype(np.float64) * 9
    ) / 16
    np.testing.assert_array_equal(mean.result()["w"], ref)
    np.testing.assert_array_equal(mean.result()["w"], ref)  # taking it twice is harmless
    with pytest.raises(FedcliError):
        mean.add(deltas[0], 1)
