"""`fedcli report` on a real small federation, and the fast paths it relies on staying exact."""

import json
import re

import numpy as np
import pytest
from conftest import BANKS
from PIL import Image
from safetensors.numpy import load as st_load

from fedcli import keys
from fedcli import rounds as R
from fedcli import tensors as T
from fedcli.aggregate import CHUNK, FedAvg, apply
from fedcli.errors import StoreError, VerificationError
from fedcli.models import build, shapes
from fedcli.spec import ModelSpec
from fedcli.store.folder import FolderStore


def _signed_update(fed, signer: str, member: str, r: int, **extra) -> None:
    private, _ = keys.load_private(fed.key(signer))
    manifest = {"kind": "update", "format": 1, "federation_id": "credit-demo", "round": r, "member": member,
                "base_sha256": "0" * 64, "tensors_sha256": "0" * 64, "metrics": {"loss": 0.5}, **extra}
    path = fed.store / R.update_keys(r, member)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(keys.sign_manifest(private, manifest))


def test_report_png_and_html(fed, tmp_path):
    for b in BANKS:
        fed.train(b)
    fed.aggregate()
    for b in ("bank-a", "bank-b"):
        fed.train(b)  # round 2 stays open
    out = tmp_path / "out" / "rep.html"
    res = fed.cli("report", fed.store, "--out", out)
    assert "6 updates over 2 rounds" in res.output
    png = out.with_suffix(".png")
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 1000 and im.size[1] >= 700
        # a real figure, not a blank canvas: many distinct colours
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 200
    assert png.stat().st_size > 30_000
    page = out.read_text()
    assert "data:image/png;base64," in page and "no DP recorded" in page
    for b in BANKS:
        assert b in page
    cells = re.findall(r"<tr><td>(\d+)</td><td>([a-z-]+)</td><td><span class=\"(\w+)\"", page)
    assert sorted(cells) == sorted([("1", b, "accepted") for b in BANKS]
                                   + [("2", "bank-a", "submitted"), ("2", "bank-b", "submitted")])
    # the numbers in the table are the ones the banks signed
    signed = json.loads((fed.store / "rounds/000001/updates/bank-c.json").read_text())
    assert f"{signed['metrics']['auc_after']:.4f}" in page

    # DP updates: epsilon per bank per round goes to the privacy panel; a forged manifest is flagged
    _signed_update(fed, "bank-c", "bank-c", 2, dp={"mode": "update", "epsilon": 0.75})
    _signed_update(fed, "bank-c", "bank-d", 2, dp={"mode": "update", "epsilon": 0.1})
    fed.cli("report", fed.store, "--out", out)
    page = out.read_text()
    assert "no DP recorded" not in page and "cumulative budget" in page
    assert re.search(r"<td>2</td><td>bank-c</td>.*<td>0\.750</td>", page)
    assert re.search(r"<td>2</td><td>bank-d</td><td><span class=\"invalid\">.*signature", page)
    assert "0.100" not in page


def test_report_on_a_store_without_federation(tmp_path, fed):
    res = fed.cli("report", tmp_path / "empty", "--out", tmp_path / "r.html", code=1)
    assert "no federation" in res.output


def test_model_shapes_match_torch_without_torch():
    for spec in (ModelSpec("logreg"), ModelSpec("mlp", (16,)), ModelSpec("mlp", (5, 7, 3))):
        built = {k: tuple(v.shape) for k, v in build(spec, 25).state_dict().items()}
        assert list(shapes(spec, 25).items()) == list(built.items())


def test_chunked_fedavg_equals_float64_reference():
    rng = np.random.default_rng(1)
    shp = {"w": (3, CHUNK + 17), "b": (5,)}
    deltas = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shp.items()} for _ in range(3)]
    weights = [10, 3, 250]
    avg = FedAvg(shp)
    for d, w in zip(deltas, weights):
        avg.add({k: v.copy() for k, v in d.items()}, w)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shp.items()}
    got = apply(base, avg.mean())
    for k in shp:
        ref = sum(d[k].astype(np.float64) * w for d, w in zip(deltas, weights)) / sum(weights)
        np.testing.assert_array_equal(avg.mean()[k], ref)
        np.testing.assert_array_equal(got[k], (base[k].astype(np.float64) + ref).astype(np.float32))
    with pytest.raises(ValueError):
        avg.add(deltas[0], 1)


def _raw(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + body


def test_zero_copy_decode_matches_safetensors_and_refuses_bad_layouts():
    rng = np.random.default_rng(2)
    tensors = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    data = T.encode(tensors)
    got, ref = T.decode(data, {"a": (4, 3), "b": (5,)}, "x"), st_load(data)
    for k in tensors:
        np.testing.assert_array_equal(got[k], ref[k])
    shp = {"a": (2,), "b": (2,)}
    body = np.arange(4, dtype=np.float32).tobytes()
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    assert T.decode(_raw(ok, body), shp, "x")["b"].tolist() == [2.0, 3.0]
    bad = [
        {**ok, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},  # overlap
        {**ok, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 12]}},  # length != shape
        {**ok, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}},
        {**ok, "a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
        {**ok, "a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}},
        {**ok, "a": {"dtype": "F32", "shape": [2], "data_offsets": [False, 8]}},  # bool is not an offset
        ["not", "a", "table"],
    ]
    for header in bad:
        with pytest.raises(VerificationError, match="not a valid safetensors"):
            T.decode(_raw(header, body), shp, "x")
    with pytest.raises(VerificationError, match="not a valid safetensors"):
        T.decode(_raw(ok, body + b"\0\0\0\0"), shp, "x")  # trailing bytes
    with pytest.raises(VerificationError, match="dtype"):
        T.decode(_raw({k: {**v, "dtype": "I32"} for k, v in ok.items()}, body), shp, "x")


def test_streamed_read_hashes_and_reuses_the_buffer(tmp_path):
    store = FolderStore(tmp_path)
    shp = {"w": (1000,)}
    one, two = (T.encode({"w": np.full(1000, v, np.float32)}) for v in (1.0, 2.0))
    store.put("u/one.safetensors", one)
    store.put("u/two.safetensors", two)
    buf = bytearray(T.max_file_size(shp))
    a = R.read_tensors(store, "u/one.safetensors", T.sha256(one), shp, "one", buffer=buf)
    assert a["w"][0] == 1.0
    b = R.read_tensors(store, "u/two.safetensors", T.sha256(two), shp, "two", buffer=buf)
    assert b["w"][0] == 2.0 and a["w"][0] == 2.0  # views into the same reused buffer
    with pytest.raises(VerificationError, match="sha256"):
        R.read_tensors(store, "u/two.safetensors", T.sha256(one), shp, "two")
    with pytest.raises(StoreError, match="larger than expected"):
        list(store.read_into("u/two.safetensors", memoryview(bytearray(len(two) - 1))))
    # the folder store really streams (chunk by chunk into the caller's buffer)
    chunks = list(store.read_into("u/two.safetensors", memoryview(buf), chunk=1000))
    assert len(chunks) == -(-len(two) // 1000) and bytes(buf[: len(two)]) == two


def test_report_epsilon_from_real_dp_manifests(tmp_path, credit_split):
    from conftest import ROOT, make_fed

    from fedcli import privacy

    template = (ROOT / "examples" / "federation.toml").read_text()
    dp = '\n[privacy]\nmode = "update"\nclip = 0.5\nnoise_multiplier = 1.0\nbudget_epsilon = 40\n'
    fed = make_fed(tmp_path, credit_split, template + dp)
    for _ in (1, 2):
        for b in BANKS:
            fed.train(b)
        fed.aggregate()
    out = tmp_path / "dp.html"
    fed.cli("report", fed.store, "--out", out)
    page = out.read_text()
    assert "no DP recorded" not in page and "budget ε=40" in page
    for r in (1, 2):  # the same composition the bank's ledger makes: r update-level releases
        eps = privacy.epsilon_update_level(1.0, r, 1e-5)
        for b in BANKS:
            assert re.search(rf"<td>{r}</td><td>{b}</td>.*<td>{eps:.3f}</td>", page)
    with Image.open(out.with_suffix(".png")) as im:
        assert im.format == "PNG" and im.size[0] >= 1000
