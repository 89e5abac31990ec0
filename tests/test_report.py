"""`fedcli report` on real small federations (plain and with differential privacy)."""

import json
import re

from helpers import BANKS, TEMPLATE, make_fed
from PIL import Image

from fedcli import keys
from fedcli.errors import ExitCode
from fedcli.privacy import accounting
from fedcli.protocol import rounds


def _signed_update(fed, signer: str, member: str, r: int, **extra) -> None:
    private, _ = keys.load_private(fed.key(signer))
    manifest = {
        "kind": "update",
        "format": 1,
        "federation_id": "credit-demo",
        "round": r,
        "member": member,
        "base_sha256": "0" * 64,
        "tensors_sha256": "0" * 64,
        "metrics": {"loss": 0.5},
        "compression": {"method": "none"},
        "created_at": "2026-01-01T00:00:00+00:00",
        "nonce": "00",
        **extra,
    }
    path = fed.store / rounds.update_keys(r, member)[1]
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
    assert sorted(cells) == sorted(
        [("1", b, "accepted") for b in BANKS] + [("2", "bank-a", "submitted"), ("2", "bank-b", "submitted")]
    )
    # the numbers in the table are the ones the banks signed
    signed = json.loads((fed.store / "rounds/000001/updates/bank-c.json").read_text())
    assert f"{signed['metrics']['auc_after']:.4f}" in page

    # DP updates: epsilon per bank per round goes to the privacy panel; a forged manifest is flagged

    _signed_update(fed, "bank-c", "bank-c", 2, dp=accounting.Mechanism("update", 1.5, 1.0, 1, 1.0).manifest())
    _signed_update(fed, "bank-c", "bank-d", 2, dp=accounting.Mechanism("update", 4.0, 1.0, 1, 1.0).manifest())
    fed.cli("report", fed.store, "--out", out)
    page = out.read_text()
    assert "no DP recorded" not in page and "cumulative budget" in page
    assert re.search(rf"<td>2</td><td>bank-c</td>.*<td>{accounting.epsilon_update_level(1.5, 1, 1e-5):.3f}</td>", page)
    assert re.search(r"<td>2</td><td>bank-d</td><td><span class=\"invalid\">.*signature", page)
    assert f"{accounting.epsilon_update_level(4.0, 1, 1e-5):.3f}" not in page

    # a manifest signed by its bank but off its contract is listed as invalid, never plotted
    _signed_update(fed, "bank-a", "bank-a", 2, num_examples=10**400)
    _signed_update(fed, "bank-b", "bank-b", 2, metrics={"loss": 0.5}, epsilon=3)
    fed.cli("report", fed.store, "--out", out)
    page = out.read_text()
    assert re.search(r"<td>2</td><td>bank-a</td><td><span class=\"invalid\">.*num_examples", page)
    assert re.search(r"<td>2</td><td>bank-b</td><td><span class=\"invalid\">.*unknown key", page)


def test_report_on_a_store_without_federation(tmp_path, fed):
    res = fed.cli("report", tmp_path / "empty", "--out", tmp_path / "r.html", code=1)
    assert "no federation" in res.output


def test_report_epsilon_from_real_dp_manifests(tmp_path, credit_split):
    dp = '\n[privacy]\nmode = "update"\nclip = 0.5\nnoise_multiplier = 1.0\nbudget_epsilon = 40\n'
    fed = make_fed(tmp_path, credit_split, TEMPLATE + dp)
    for _ in (1, 2):
        for b in BANKS:
            fed.train(b)
        fed.aggregate()
    out = tmp_path / "dp.html"
    fed.cli("report", fed.store, "--out", out)
    page = out.read_text()
    assert "no DP recorded" not in page and "budget ε=40" in page
    for r in (1, 2):  # the same composition the bank's ledger makes: r update-level releases
        eps = accounting.epsilon_update_level(1.0, r, 1e-5)
        for b in BANKS:
            assert re.search(rf"<td>{r}</td><td>{b}</td>.*<td>{eps:.3f}</td>", page)
    with Image.open(out.with_suffix(".png")) as im:
        assert im.format == "PNG" and im.size[0] >= 1000


def test_report_checks_the_pinned_coordinator(tmp_path, credit_split):
    """A self-signed store is not the federation: with --coordinator, report refuses another key's store."""
    fed = make_fed(tmp_path / "fed", credit_split)
    out = tmp_path / "r.html"
    res = fed.cli("report", fed.store, "--out", out)
    assert "not pinned" in res.output
    res = fed.cli("report", fed.store, "--out", out, "--coordinator", fed.pub("coordinator"))
    assert "not pinned" not in res.output and out.exists()
    res = fed.cli(
        "report", fed.store, "--out", tmp_path / "x.html", "--coordinator", fed.pub("bank-a"), code=ExitCode.VERIFY
    )
    assert not (tmp_path / "x.html").exists()


HOLDOUT = TEMPLATE.replace("[training]", "[evaluation]\nholdout = 0.2\n\n[training]", 1)


def test_report_shows_the_holdout_per_round_for_the_federation_and_each_bank(tmp_path, credit_split):
    from fedcli.protocol.evaluations import collect, evaluation_key
    from fedcli.store import open_store

    fed = make_fed(tmp_path, credit_split, HOLDOUT)
    for _ in (1, 2):
        for b in BANKS:
            fed.train(b)
        fed.aggregate()
    planted = fed.store / evaluation_key(1, "bank-d")
    planted.write_text('{"kind": "evaluation", "auc": 0.999}')  # unsigned: ignored, never a number
    out = tmp_path / "rep.html"
    fed.cli("report", fed.store, "--out", out, "--coordinator", fed.pub("coordinator"))
    page = out.read_text()
    found = collect(open_store(str(fed.store)))
    assert found.rounds == [0, 1] and sorted(found.by_round[1]) == ["bank-a", "bank-b", "bank-c"]
    for r in (0, 1):
        fed_auc = found.federation(r).metrics()["auc"]
        banks = f"{len(found.by_round[r])}/4"
        assert re.search(rf"<td>{r}</td><td>{banks}</td><td>[\d,]+</td><td>[\d.]+</td><td>{fed_auc:.4f}</td>", page)
        for b, hist in found.by_round[r].items():
            assert f"<td>{r}</td><td>{b}</td><td>{hist.rows:,}</td>" in page
    assert "Evaluation files ignored" in page and "bank-d.json" in page and "0.999" not in page
    assert "Calibration of the global model of round 1" in page
    assert "no bank-alone baseline" in page.lower()
    with Image.open(out.with_suffix(".png")) as im:
        assert im.size[1] >= 1800 and len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 200


def test_report_under_dp_shows_the_noised_holdout_and_draws_the_budget(tmp_path, credit_split):
    dp = '\n[privacy]\nmode = "update"\nclip = 0.5\ntarget_epsilon = 30\nrounds = 2\n'
    fed = make_fed(tmp_path, credit_split, HOLDOUT + dp)
    for b in BANKS:
        fed.train(b)
    fed.aggregate()
    out = tmp_path / "dp.html"
    fed.cli("report", fed.store, "--out", out)
    page = out.read_text()
    assert "each bank published only its counts, each with Gaussian noise of std 5 rows" in page
    assert re.search(r"<td>0</td><td>4/4</td><td>[\d,]+</td>", page)  # the federation's noised holdout row
    assert "budget ε=30" in page  # the budget from target_epsilon, not only an explicit budget_epsilon


def test_report_without_a_holdout_says_the_spec_holds_none_out(fed, tmp_path):
    for b in BANKS:
        fed.train(b)
    fed.aggregate()
    fed.cli("report", fed.store, "--out", tmp_path / "r.html")
    assert "[evaluation] holdout is 0" in (tmp_path / "r.html").read_text()


def test_report_of_a_fresh_federation_says_nothing_is_there_yet(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, HOLDOUT)
    res = fed.cli("report", fed.store, "--out", tmp_path / "r.html")
    assert "0 updates over 0 rounds" in res.output
    assert "no holdout evaluation published yet" in (tmp_path / "r.html").read_text()
    with Image.open(tmp_path / "r.png") as im:
        assert im.format == "PNG"
