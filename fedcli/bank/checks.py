"""What a bank refuses to sign or send: non-finite weights or updates, and someone else's manifest under its name."""

from typing import NoReturn

import numpy as np

from fedcli import keys
from fedcli.errors import FedcliError, NotRegular, StoreError, VerificationError
from fedcli.keys import PublicIdentity
from fedcli.protocol import rounds
from fedcli.protocol.spec import Spec
from fedcli.store import Store

# Standardised features give weights of order 1; a global weight beyond this is a broken or
# poisoned model (one member's huge but finite update), not something a bank's table causes.
GLOBAL_WEIGHT_ALARM = 1e6


def require_finite(what: str, tensors: dict, base: rounds.Global | None = None) -> None:
    """NaN or infinity in weights or an update is refused before it can be signed or sent."""
    bad = [k for k, v in tensors.items() if not np.all(np.isfinite(v))]
    if bad:
        refuse_non_finite(f"{what} hold non-finite values (in {', '.join(bad[:3])})", base)


def refuse_non_finite(problem: str, base: rounds.Global | None = None) -> NoReturn:
    """Nothing is submitted; blame the global model when its weights are absurd, else the table."""
    largest = (
        0.0 if base is None else max((float(np.max(np.abs(v))) for v in base.tensors.values() if v.size), default=0.0)
    )
    if base is not None and largest > GLOBAL_WEIGHT_ALARM:
        raise VerificationError(
            f"{problem}: nothing was submitted. The global model of round {base.round} has weights up to "
            f"{largest:.3g}, so training on it overflows: it is broken or poisoned by one member's update; "
            "tell the coordinator (a [strategy] max_norm bounds every update)",
            reason="not-finite",
        )
    raise FedcliError(f"{problem}: nothing was submitted (check the table for extreme values)", reason="not-finite")


def check_own_manifest(store: Store, spec: Spec, r: int, me: PublicIdentity, mkey: str) -> None:
    """An update manifest under my name counts as mine only if my key signed it for this round."""
    what = f"update manifest for {me.name}"
    try:
        manifest = keys.verify_manifest(rounds.read_manifest(store, mkey, what), me, what)
    except StoreError as e:
        if not isinstance(e, NotRegular):
            raise
        manifest = None
    except FedcliError:
        manifest = None
    if manifest is None:
        raise VerificationError(
            f"an update manifest for {me.name} that this key did not sign sits at {mkey}; "
            "ask the coordinator to remove it",
            reason="bad-signature",
        )
    try:
        rounds.expect(manifest, what, kind="update", federation_id=spec.federation_id, round=r, member=me.name)
    except FedcliError:
        raise VerificationError(
            f"an update manifest at {mkey} was signed by this key for another round or "
            "federation (a replayed copy); ask the coordinator to remove it",
            reason="wrong-round",
        ) from None
