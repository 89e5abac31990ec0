"""The spec contract, driven through the CLI as a new user with typos and as an attacker with the shared folder.

A template problem ends `init` with one line naming the file and the field, exit 1, and an
empty store. A store spec that is unsigned, or signed but outside the contract, ends every
command with one line and exit 4 before anything is written.
"""

import subprocess
import sys

import pytest
from helpers import BANKS, ROOT, TEMPLATE, TEMPLATE_PATH, make_fed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedcli import keys
from fedcli.cli import app
from fedcli.errors import ExitCode, FedcliError

MEMBERS = BANKS[:3]


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    runner = CliRunner()
    for name in ("coordinator", *MEMBERS):
        res = runner.invoke(app, ["keygen", name, "--out", str(root)])
        assert res.exit_code == 0, res.output
    return root


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})  # wide: no wrapped cells


def one_line(res, code: int) -> str:
    """The single line a refused command prints (no traceback), after checking its exit code."""
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == code, f"exit {res.exit_code} != {code}\n{res.output}\n{res.exception!r}"
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def init(key_dir, tmp_path, text: str | bytes, key: str = "coordinator", members=MEMBERS):
    tmp_path.mkdir(parents=True, exist_ok=True)
    template = tmp_path / "template.toml"
    if isinstance(text, bytes):
        template.write_bytes(text)
    else:
        template.write_text(text)
    return run(
        "init",
        tmp_path / "store",
        "--spec",
        template,
        "--key",
        key_dir / f"{key}.key",
        *[x for m in members for x in ("--member", key_dir / f"{m}.pub")],
    )


def store_files(tmp_path):
    store = tmp_path / "store"
    return [p for p in store.rglob("*") if p.is_file()] if store.exists() else []


def refused(key_dir, tmp_path, text, expected: str):
    line = one_line(init(key_dir, tmp_path, text), ExitCode.ERROR)
    assert str(tmp_path / "template.toml") in line and expected in line, line
    assert store_files(tmp_path) == []


def edit(old: str, new: str) -> str:
    assert old in TEMPLATE, old
    return TEMPLATE.replace(old, new, 1)


# ----------------------------------------------------------------------------- typos in the template


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            TEMPLATE + '\n[privcy]\nmode = "record"\ntarget_epsilon = 3.0\n',
            "unknown key 'privcy'; did you mean 'privacy'?",
        ),
        (TEMPLATE + "\n[secagg]\nenable = true\n", "unknown key 'secagg.enable'; did you mean 'enabled'?"),
        (edit("epochs = 3", "epoch = 50"), "unknown key 'training.epoch'; did you mean 'epochs'?"),
        (edit("min_clients = 3", "min_client = 3"), "unknown key 'federation.min_client'; did you mean 'min_clients'?"),
        (edit("epochs = 3", 'epochs = 3\noptimizer = "sgd"'), "unknown key 'training.optimizer'"),
        (edit("epochs = 3", "epochs = 3\nmomentum = 0.9"), "unknown key 'training.momentum'"),
        (TEMPLATE + '\n[strategy]\noptimizer = "fedadam"\n', "unknown key 'strategy.optimizer'"),
        (TEMPLATE + "\n[strategy.asyn]\nbuffer_size = 2\n", "unknown key 'strategy.asyn'; did you mean 'async'?"),
        (TEMPLATE + '\n[strategy.server]\noptimiser = "fedadam"\n', "did you mean 'optimizer'?"),
        (edit("std = 8.547769", "sd = 8.547769"), "unknown key 'data.numeric[0].sd'; did you mean 'std'?"),
        (edit("[model]", "[modle]"), "unknown key 'modle'; did you mean 'model'?"),
    ],
)
def test_typos_are_refused_with_did_you_mean(key_dir, tmp_path, text, expected):
    refused(key_dir, tmp_path, text, expected)


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("epochs = 3", "epochs = 10001", "'training.epochs' input should be less than or equal to 10000"),
        ("batch_size = 32", "batch_size = 0", "'training.batch_size' input should be greater than or equal to 1"),
        ("lr = 0.02", "lr = 0", "'training.lr' input should be greater than 0"),
        ("lr = 0.02", "lr = 11", "'training.lr' input should be less than or equal to 10"),
        ("min_clients = 3", "min_clients = 0", "'federation.min_clients' input should be greater than or equal to 1"),
        ("min_clients = 3", "min_clients = 4", "min_clients must be between 1 and the number of members (3)"),
        ("deadline_minutes = 0", "deadline_minutes = -1", "'federation.deadline_minutes' input should be greater"),
        ("deadline_minutes = 0", "deadline_minutes = 525601", "'federation.deadline_minutes' input should be less"),
        ("deadline_minutes = 0", "deadline_minutes = 0\nmax_rows_per_member = 0", "'federation.max_rows_per_member'"),
        (
            "deadline_minutes = 0",
            "deadline_minutes = 0\nmax_rows_per_member = 10000000001",
            "less than or equal to 10000000000",
        ),
        ("seed = 42", "seed = 4294967296", "'model.seed' input should be less than or equal to 4294967295"),
        ("hidden = [16]", "hidden = [0]", "'model.hidden[0]' input should be greater than or equal to 1"),
        ("hidden = [16]", "hidden = [4097]", "'model.hidden[0]' input should be less than or equal to 4096"),
        ("hidden = [16]", "hidden = []", "'model.hidden' list should have at least 1 item"),
        ("std = 8.547769", "std = -1.0", "'data.numeric[0].std' input should be greater than 0"),
        ("mean = 9.132939", "mean = inf", "'data.numeric[0].mean' input should be a finite number"),
        ("mean = 9.132939", "mean = nan", "'data.numeric[0].mean' input should be a finite number"),
        ('"no",\n    "yes",', '"no",\n    "no",', "'data.categorical[2].levels' must be unique ('no' appears twice)"),
        ('{ name = "Time",', '{ name = "Age",', "'data' declares the feature 'Age' twice"),
        ('target = "Status"', 'target = ""', "'data.target' string should have at least 1 character"),
    ],
)
def test_out_of_range_numbers_are_refused(key_dir, tmp_path, old, new, expected):
    refused(key_dir, tmp_path, edit(old, new), expected)


@pytest.mark.parametrize(
    "privacy,expected",
    [
        (
            'mode = "update"\nnoise_multiplier = 1.0\nbudget_epsilon = 8\ndelta = 1.0',
            "'privacy.delta' input should be less than 1",
        ),
        ('mode = "update"\ntarget_epsilon = 0', "'privacy.target_epsilon' input should be greater than 0"),
        ('mode = "update"\nnoise_multiplier = 1.0', "'privacy' needs budget_epsilon with a fixed noise_multiplier"),
        ('mode = "record"', "'privacy' needs exactly one of noise_multiplier or target_epsilon"),
        ('mode = "update"\nclip = nan\ntarget_epsilon = 3', "'privacy.clip' input should be a finite number"),
        ('mode = "laplace"', "'privacy.mode' input should be 'none', 'update' or 'record'"),
    ],
)
def test_privacy_table_is_checked(key_dir, tmp_path, privacy, expected):
    refused(key_dir, tmp_path, TEMPLATE + f"\n[privacy]\n{privacy}\n", expected)


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("epochs = 3", 'epochs = "3"', "'training.epochs' input should be a valid integer (got '3')"),
        ("epochs = 3", "epochs = 3.0", "'training.epochs' input should be a valid integer (got 3.0)"),
        ("hidden = [16]", "hidden = 16", "'model.hidden' input should be a valid list"),
        ('positive = "bad"', "positive = true", "'data.positive' input should be a valid string (got True)"),
        ('"no",\n    "yes",', "0,\n    1,", "'data.categorical[2].levels[0]' input should be a valid string"),
        ("seed = 42", "seed = 1979-05-27", "'model.seed' input should be a valid integer"),
        ("[training]\nepochs = 3\nbatch_size = 32\nlr = 0.02\n", "", "'training' input should be a valid dictionary"),
        ("[federation]", 'federation = "x"\n[federation_]', "'federation' must be a table"),
        ("[federation]", 'members = "x"\n[federation]', "'members' must be a list of tables"),
    ],
)
def test_wrong_types_are_refused(key_dir, tmp_path, old, new, expected):
    text = edit(old, new)
    refused(key_dir, tmp_path, "training = 3\n" + text if "'training'" in expected else text, expected)


@pytest.mark.parametrize(
    "member,expected",
    [
        ('name = "bank-q"\ned25519 = "abc"', "'members[0].ed25519' is not base64 (got 'abc')"),
        ('name = "bank-q"\ned25519 = "AAAA"', "'members[0].ed25519' is not a 32-byte Ed25519 public key (3 bytes)"),
        ('name = "Bank Q"\ned25519 = "AAAA"', "'members[0].name' invalid name 'Bank Q'"),
        ('name = "bank-q"\ned25519 = "{key}"\nx25519 = "zz"', "'members[0].x25519' is not a base64 X25519 public key"),
        ('name = "bank-q"\ned25519 = "{key}"\nx509 = "zz"', "unknown key 'members[0].x509'; did you mean 'x25519'?"),
    ],
)
def test_member_entries_in_the_template_are_checked(key_dir, tmp_path, member, expected):
    key = keys.load_public(key_dir / "bank-c.pub").ed25519
    refused(key_dir, tmp_path, TEMPLATE + "\n[[members]]\n" + member.replace("{key}", key) + "\n", expected)


def test_secagg_enable_typo_no_longer_means_off(key_dir, tmp_path):
    """The issue's case: `enable = true` used to leave secure aggregation silently off."""
    refused(key_dir, tmp_path, TEMPLATE + "\n[secagg]\nenable = true\n", "did you mean 'enabled'?")
    res = init(key_dir, tmp_path, TEMPLATE + "\n[secagg]\nenabled = true\n")
    assert res.exit_code == 0, res.output
    assert "on: the coordinator sees only the sum" in " ".join(res.output.split())


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda: b"x = " + b"[" * 3000 + b"]" * 3000, "nests 3000 levels deep (at most 16); refused before parsing"),
        (lambda: TEMPLATE.replace("[model]", "[model]\n" + "a." * 3000 + "b = 1", 1).encode(), "unknown key 'model.a'"),
        (lambda: TEMPLATE.encode("utf-16"), "is not UTF-8 text"),
        (lambda: bytes(range(256)) * 8, "is not UTF-8 text"),
        (lambda: b"# padding\n" * 110_000, "more than the 1,048,576 allowed; refused before reading"),
    ],
)
def test_hostile_template_bytes_are_one_line(key_dir, tmp_path, make, expected):
    refused(key_dir, tmp_path, make(), expected)


def test_missing_template_and_folder_template(key_dir, tmp_path):
    res = run("init", tmp_path / "store", "--spec", tmp_path / "nope.toml", "--key", key_dir / "coordinator.key")
    assert "cannot read spec template" in one_line(res, ExitCode.ERROR)
    res = run("init", tmp_path / "store", "--spec", tmp_path, "--key", key_dir / "coordinator.key")
    assert "spec template" in one_line(res, ExitCode.ERROR)
    assert store_files(tmp_path) == []


# ----------------------------------------------------------------------------- roster


def test_a_banks_key_cannot_be_the_coordinators(key_dir, tmp_path):
    res = init(key_dir, tmp_path, TEMPLATE, key="bank-a")
    assert "is the public half of the coordinator key" in one_line(res, ExitCode.ERROR)
    # the same through the template: the coordinator's key already listed as a member
    ident = keys.load_public(key_dir / "coordinator.pub")
    text = TEMPLATE + f'\n[[members]]\nname = "sneaky"\ned25519 = "{ident.ed25519}"\n'
    line = one_line(init(key_dir, tmp_path, text), ExitCode.ERROR)
    assert "the coordinator's key is also member sneaky's key" in line
    assert store_files(tmp_path) == []


def test_a_member_given_twice_is_refused(key_dir, tmp_path):
    res = init(key_dir, tmp_path, TEMPLATE, members=("bank-a", "bank-b", "bank-a"))
    assert "is the same key as" in one_line(res, ExitCode.ERROR)
    renamed = tmp_path / "renamed.pub"
    renamed.write_text((key_dir / "bank-b.pub").read_text().replace('name = "bank-b"', 'name = "bank-z"'))
    res = run(
        "init",
        tmp_path / "store",
        "--spec",
        TEMPLATE_PATH,
        "--key",
        key_dir / "coordinator.key",
        "--member",
        key_dir / "bank-a.pub",
        "--member",
        key_dir / "bank-b.pub",
        "--member",
        renamed,
    )
    assert "is the same key as" in one_line(res, ExitCode.ERROR)
    assert store_files(tmp_path) == []


# ----------------------------------------------------------------------------- what is in force


def test_init_says_what_is_in_force(key_dir, tmp_path):
    res = init(key_dir, tmp_path / "plain", TEMPLATE)
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    for words in (
        "logreg on 26 features",
        "no differential privacy",
        "off: the coordinator sees each bank's update",
        "sync, rule fedavg, server optimiser fedavg",
        "3 of 3 members",
        "100,000,000",
        "Round 0",
    ):
        assert words in said, words
    dp = TEMPLATE.replace('kind = "logreg"', 'kind = "mlp"') + (
        '\n[privacy]\nmode = "record"\ntarget_epsilon = 3.0\nrounds = 5\n'
        '\n[strategy.server]\noptimizer = "fedadam"\nlr = 0.05\n\n[strategy.compression]\nmethod = "int8"\n'
    )
    res = init(key_dir, tmp_path / "dp", dp)
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    for words in (
        "mlp on 26 features, hidden layers 16",
        "record-level",
        "budget epsilon 3 at delta 1e-05",
        "target epsilon 3 over 5 rounds",
        "server optimiser fedadam (lr 0.05)",
        "int8",
    ):
        assert words in said, words
    assert "no differential privacy" not in said


# ----------------------------------------------------------------------------- the spec on the store


@pytest.fixture
def fed(tmp_path, credit_split):
    return make_fed(tmp_path, credit_split, TEMPLATE.replace("min_clients = 3", "min_clients = 2"), banks=MEMBERS)


def plant(fed, data: bytes, signer: str | None = "coordinator") -> None:
    """Replace the store's spec; re-sign it with `signer`'s key (None: keep the old signature)."""
    (fed.store / "federation.toml").write_bytes(data)
    if signer:
        private, _ = keys.load_private(fed.key(signer))
        (fed.store / "federation.toml.sig").write_bytes(keys.sign_bytes(private, data).encode())


def spec_bytes(fed) -> bytes:
    return (fed.store / "federation.toml").read_bytes()


BAD_SPECS = {
    "deep": lambda s: s + b"\nx = " + b"[" * 3000 + b"]" * 3000,
    "wrong-type": lambda s: s.replace(b"epochs = 3", b'epochs = "3"'),
    "unknown-key": lambda s: s.replace(b"[training]", b"[training]\nepoch = 50"),
    "bad-utf8": lambda s: s + b"\n# \xff\xfe\n",
    "no-coordinator": lambda s: s.replace(b"[federation.coordinator]", b"[federation.coordinator_]"),
}


@pytest.mark.parametrize("signer", ["coordinator", None])
@pytest.mark.parametrize("kind", sorted(BAD_SPECS))
def test_planted_store_spec_is_refused_by_every_reader(fed, kind, signer):
    plant(fed, BAD_SPECS[kind](spec_bytes(fed)), signer)
    before = sorted(p for p in fed.store.rglob("*") if p.is_file())
    for res in (
        fed.train("bank-a", code=None),
        fed.cli("status", fed.store, code=None),
        fed.cli("spec", "show", fed.store, code=None),
        fed.cli("spec", "show", fed.store, "--coordinator", fed.pub("coordinator"), code=None),
        fed.aggregate(code=None),
    ):
        line = one_line(res, ExitCode.VERIFY)
        assert "federation spec" in line, line
    assert sorted(p for p in fed.store.rglob("*") if p.is_file()) == before


def test_pinned_key_is_checked_before_parsing(fed):
    """With a pinned key an unsigned spec is refused for its signature, whatever it contains."""
    plant(fed, b"x = " + b"[" * 3000 + b"]" * 3000, signer=None)
    line = one_line(fed.train("bank-a", code=None), ExitCode.VERIFY)
    assert "signature does not verify with the pinned coordinator key" in line and "levels deep" not in line


def test_self_signed_store_is_trusted_only_without_a_pin(fed):
    """An attacker writes their own key into the spec and signs it: only a pinned key catches it."""
    fed.cli("keygen", "mallory", "--out", fed.root / "mallory")
    mallory = keys.load_public(fed.pub("mallory"))
    real = keys.load_public(fed.pub("coordinator"))
    plant(fed, spec_bytes(fed).replace(real.ed25519.encode(), mallory.ed25519.encode()), signer="mallory")
    res = fed.cli("spec", "show", fed.store)
    assert "not pinned" in res.output and mallory.fingerprint in res.output
    line = one_line(
        fed.cli("spec", "show", fed.store, "--coordinator", fed.pub("coordinator"), code=None), ExitCode.VERIFY
    )
    assert "refusing to trust this store" in line
    assert "refusing to trust" in one_line(fed.train("bank-a", code=None), ExitCode.VERIFY)


def test_oversized_store_spec_is_refused_before_reading(fed):
    plant(fed, spec_bytes(fed) + b"#" * (1 << 20))
    line = one_line(fed.cli("status", fed.store, code=None), ExitCode.VERIFY)
    assert "federation.toml" in line and "allowed" in line


def test_spec_show_prints_every_setting_and_the_roster(fed):
    res = fed.cli("spec", "show", fed.store, "--coordinator", fed.pub("coordinator"))
    said = " ".join(res.output.split())
    for words in (
        "federation.min_clients │ 2 │ spec",
        "training.epochs │ 3 │ spec",
        'privacy.mode │ "none" │ default',
        "strategy.server.lr │ 1 │ default",
        "data.numeric Age",
        "data.categorical Job",
        "4 levels: fixed,",
        "no differential privacy",
        "signature verified",
    ):
        assert words in said, words
    for name in ("coordinator", *MEMBERS):
        assert keys.load_public(fed.pub(name)).fingerprint in said
    assert "not pinned" not in said
    unpinned = fed.cli("spec", "show", fed.store)
    assert "signature checked against the key named in the spec itself (not pinned)" in " ".join(
        unpinned.output.split()
    )
    fed.cli("keygen", "other", "--out", fed.root / "other")
    line = one_line(fed.cli("spec", "show", fed.store, "--coordinator", fed.pub("other"), code=None), ExitCode.VERIFY)
    assert "refusing to trust this store" in line


# ----------------------------------------------------------------------------- the reference page and the readers


def test_docs_spec_md_is_generated_from_the_models():
    from fedcli.protocol.specdoc import render

    committed = (ROOT / "docs" / "spec.md").read_text()
    assert committed == render(), "docs/spec.md is stale: run `python -m fedcli.protocol.specdoc > docs/spec.md`"
    for key in ("`max_rows_per_member`", "`[[data.categorical]]`", "`[strategy.async]`", "`budget_epsilon`"):
        assert key in committed


def test_help_does_not_import_pydantic():
    code = "import sys; from fedcli.cli import app; print('pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


_LINES = [
    b"[federation]",
    b"[model]",
    b"[data]",
    b"[[members]]",
    b"[privacy]",
    b'kind = "mlp"',
    b"epochs = 3",
    b"x = [[[[1]]]]",
    b"a.b.c = 1",
    b'name = "\\u0000"',
    b"mean = nan",
    b"seed = 1979-05-27",
    b"[[data.numeric]]",
    b"\xff",
    b"hidden = [1e400]",
    b"id = 'x'",
    b'positive = "bad"',
    b"min_clients = 9999999999999999999999",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(_LINES), st.binary(max_size=40)), max_size=25))
def test_spec_reader_never_crashes(lines):
    """Any bytes: the reader returns a Spec or raises one FedcliError, never anything else."""
    from fedcli.protocol.spec import loads

    data = b"\n".join(lines) + b"\n" + TEMPLATE.encode()
    try:
        loads(data)
    except FedcliError as e:
        assert "\n" not in str(e)
