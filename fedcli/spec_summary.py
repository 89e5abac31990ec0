"""STUB for the bank branch only: the spec helper's `fedcli.spec.summary` replaces this file.

`fedcli train` calls `spec.summary(spec)`; until the spec branch (which owns that function)
is merged, this minimal version makes the call work. The lead deletes this file and the
one-line re-export at the end of fedcli/spec.py when merging.
"""


def summary(spec) -> list[tuple[str, str]]:
    """What is in force, as (setting, value) rows."""
    ps, st = spec.privacy, spec.strategy
    dp = "none" if not ps.enabled else f"{ps.mode}-level, budget epsilon {ps.budget_epsilon or 0:g} at delta {ps.delta:g}"
    return [
        ("model", f"{spec.model.kind} on {spec.data.n_features} features"),
        ("differential privacy", dp),
        ("secure aggregation", "on" if spec.secagg.enabled else "off"),
        ("strategy", f"{st.mode} {st.rule}, server {st.server}"),
        ("compression", st.compression),
    ]
