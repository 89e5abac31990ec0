"""Documents a party keeps on its own disk: public key files, a bank's state file, the privacy ledger.

Why typed: these files decide what a bank trusts (the state file is its defence against a
rolled-back store) and what it may still release (the ledger). A damaged or hand-edited file
must be refused with its path, never half-read. Strict pydantic models (see fedcli/contract.py);
pydantic is imported only when one of these files is read or written.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from fedcli.contract import strict_config
from fedcli.names import check_name

Name = Annotated[str, AfterValidator(check_name)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Key32 = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$", description="base64 of a 32-byte public key")]
Round = Annotated[int, Field(ge=0, le=999_999)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]

MAX_PUBLIC_KEY_BYTES = 16 * 1024
MAX_STATE_BYTES = 16 * 1024
MAX_LEDGER_BYTES = 32 << 20  # ~90,000 releases: decades of daily rounds


class PublicKeyFile(BaseModel):
    """NAME.pub as `fedcli keygen` writes it: what a bank mails to the coordinator."""

    model_config = strict_config()

    name: Name
    ed25519: Key32
    x25519: Key32 | Literal[""] = ""


class BankStateFile(BaseModel):
    """NAME.state.json: the last global model this bank trusted (rollback and fork detection)."""

    model_config = strict_config()

    federation_id: Name | None = None
    last_round: Annotated[int, Field(ge=-1, le=999_999)] = -1
    last_sha256: Sha256 | None = None
    final_round: Round | None = None  # the coordinator's signed end, once this bank saw it


class LedgerEntry(BaseModel):
    """One released update: the mechanism as run, and the epsilon after composing it."""

    model_config = strict_config()

    round: Round
    federation: Name
    mode: Literal["update", "record"]
    noise_multiplier: Positive
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    steps: Annotated[int, Field(ge=1, le=10**9)]
    clip: Positive
    delta: Annotated[float, Field(gt=0, lt=1)]
    epsilon_after: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    budget_epsilon: Positive
    time: Annotated[str, Field(min_length=1, max_length=40)]
    release: Literal["evaluation"] | None = None  # what was released, when not an update (holdout evaluation)


class LedgerFile(BaseModel):
    """NAME.ledger.json: every DP release this bank made, across federations."""

    model_config = strict_config()

    version: Literal[1]
    accountant: Literal["rdp"]
    entries: Annotated[list[LedgerEntry], Field(max_length=1_000_000)]
    # whose ledger it is: a ledger of another key or federation is refused (absent in older files)
    key_fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")] | None = None
    federation_id: Name | None = None
