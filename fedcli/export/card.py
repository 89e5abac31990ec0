"""The model card: what a validator needs to know about an exported model, from signed documents only.

JSON for machines and Markdown for people, built from the verified spec (data schema, preprocessing,
training, privacy), the verified chain of global manifests (lineage by round) and, when a holdout
table is given, `fedcli evaluate`'s numbers on it. Nothing is taken from the store unverified.
"""

from __future__ import annotations

import json

from fedcli.export.graph import IR_VERSION, OPSET, input_contract, sizes

FORMAT = 1


def card(
    spec, spec_sha: str, lineage: list[dict], onnx_sha: str, evaluation: dict | None, prior: str | None = None
) -> dict:
    """The model card as a JSON-ready dict (lineage: the verified global manifests, round 0 first; prior:
    the prior correction folded into the graph, in words, or None)."""
    from fedcli.protocol.spec import summary

    last = lineage[-1]
    d = spec.data
    return {
        "kind": "fedcli-model-card",
        "format": FORMAT,
        "federation_id": spec.federation_id,
        "round": last["round"],
        "tensors_sha256": last["tensors_sha256"],
        "spec_sha256": spec_sha,
        "published_at": last["created_at"],
        "coordinator": {"name": spec.coordinator.name, "fingerprint": spec.coordinator.fingerprint},
        "model": {
            "kind": spec.model.kind,
            "layer_widths": sizes(spec),
            "output": f"P({d.target} = {d.positive}): the probability of the positive class",
            "prior_correction": prior,
        },
        "data_schema": {
            "target": d.target,
            "positive": d.positive,
            "numeric": [{"name": f.name, "mean": f.mean, "std": f.std} for f in d.numeric],
            "categorical": [{"name": c.name, "levels": list(c.levels)} for c in d.categorical],
        },
        "preprocessing": [
            "numeric: (x - mean) / std with the spec's mean and std; a missing value becomes the mean (0)",
            "categorical: one-hot over the spec's levels in their order; an undeclared or missing level is all zeros",
            "the means and stds are the spec's, signed by the coordinator (see docs/risk.md for where they come from)",
        ],
        "onnx": {
            "file": "model.onnx",
            "sha256": onnx_sha,
            "opset": OPSET,
            "ir_version": IR_VERSION,
            "inputs": input_contract(spec),
            "outputs": [
                {"name": "score", "dtype": "float32", "meaning": "P(positive class), as fedcli predict writes it"},
                {"name": "logit", "dtype": "float32", "meaning": "log-odds of the positive class"},
            ],
        },
        "training": {
            "epochs": spec.training.epochs,
            "batch_size": spec.training.batch_size,
            "learning_rate": spec.training.lr,
            "pos_weight": spec.training.pos_weight,
        },
        "settings_in_force": dict(summary(spec)),
        "members": [{"name": m.name, "fingerprint": m.fingerprint} for m in spec.members],
        "lineage": [_round(m) for m in lineage],
        "evaluation": evaluation,
        "caveats": _caveats(spec, evaluation, prior),
    }


def _round(manifest: dict) -> dict:
    return {
        "round": manifest["round"],
        "tensors_sha256": manifest["tensors_sha256"],
        "prev_sha256": manifest["prev_sha256"],
        "created_at": manifest["created_at"],
        "rule": manifest.get("rule"),
        "contributors": [
            {"member": c["member"], "rows": c["num_examples"] or None} for c in manifest.get("contributors", [])
        ],
    }


def _caveats(spec, evaluation: dict | None, prior: str | None) -> list[str]:
    out = []
    if evaluation is None:
        out.append("no holdout evaluation in this card: pass --data with a labelled holdout table")
    if prior is not None:
        out.append(f"scores are prior-corrected inside the graph: {prior}")
    elif spec.training.pos_weight != 1:
        out.append(
            f"trained with pos_weight {spec.training.pos_weight:g}: the scores' odds are that many times too high; "
            "`fedcli export --undo-pos-weight` folds the correction into the graph (this one is uncorrected)"
        )
    out.append(
        "scores are probabilities only as far as the calibration section shows; "
        "a population with another bad rate needs prior correction (docs/risk.md)"
    )
    return out


def to_json(doc: dict) -> bytes:
    return (json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _md(text) -> str:
    """A value from the spec or a file name inside a Markdown table cell: no pipe or line break breaks the table."""
    text = " ".join(str(text).split()).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("`", "'")


def to_markdown(doc: dict) -> bytes:
    """The same card for people; every number is the JSON's."""
    d, o = doc["data_schema"], doc["onnx"]
    lines = [
        f"# Model card: federation {doc['federation_id']}, global model of round {doc['round']}",
        "",
        f"- tensors sha256 `{doc['tensors_sha256']}`, spec sha256 `{doc['spec_sha256']}`",
        f"- published {doc['published_at']} by coordinator {doc['coordinator']['name']} "
        f"(fingerprint {doc['coordinator']['fingerprint']})",
        f"- model: {doc['model']['kind']}, layer widths {' -> '.join(map(str, doc['model']['layer_widths']))}; "
        f"output {doc['model']['output']}"
        + (f"; prior-corrected: {_md(doc['model']['prior_correction'])}" if doc["model"]["prior_correction"] else ""),
        "",
        "## Data schema",
        "",
        f"Target `{_md(d['target'])}`, positive class `{_md(d['positive'])}`.",
        "",
        "| numeric feature | mean | std |",
        "|---|---:|---:|",
        *(f"| {_md(f['name'])} | {f['mean']:g} | {f['std']:g} |" for f in d["numeric"]),
        "",
        "| categorical feature | levels (one-hot columns, in order) |",
        "|---|---|",
        *(f"| {_md(c['name'])} | {_md(', '.join(c['levels']))} |" for c in d["categorical"]),
        "",
        "## Preprocessing",
        "",
        *(f"- {p}" for p in doc["preprocessing"]),
        "",
        f"## ONNX (`{o['file']}`, sha256 `{o['sha256']}`, opset {o['opset']})",
        "",
        *(
            f"- input `{i['name']}` ({i['dtype']}, [rows, {len(i['columns'])}]): {_md(', '.join(i['columns']))}; "
            f"missing: {i['missing']}"
            for i in o["inputs"]
        ),
        *(f"- output `{x['name']}` ({x['dtype']}, [rows]): {x['meaning']}" for x in o["outputs"]),
        "",
        "## Training and privacy settings",
        "",
        *(f"- {k}: {_md(v)}" for k, v in doc["settings_in_force"].items()),
        "",
        "## Lineage (verified chain of signed global models)",
        "",
        "| round | published | rule | contributors (rows) | tensors sha256 |",
        "|---:|---|---|---|---|",
        *(_lineage_row(r) for r in doc["lineage"]),
        "",
        *_evaluation_md(doc["evaluation"]),
        "## Caveats",
        "",
        *(f"- {c}" for c in doc["caveats"]),
        "",
    ]
    return "\n".join(lines).encode()


def _lineage_row(r: dict) -> str:
    who = ", ".join(f"{c['member']} ({c['rows'] if c['rows'] is not None else 'withheld'})" for c in r["contributors"])
    return f"| {r['round']} | {r['created_at']} | {r['rule'] or 'initial'} | {who or '-'} | `{r['tensors_sha256'][:16]}...` |"


def _evaluation_md(ev: dict | None) -> list[str]:
    if ev is None:
        return []
    m, c, k = ev["metrics"], ev["calibration"] or {}, ev["credit"] or {}

    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    rows = [
        ("AUC", m.get("auc")),
        ("PR-AUC", m.get("pr_auc")),
        ("KS", k.get("ks")),
        ("Gini", k.get("gini")),
        ("Brier", c.get("brier")),
        ("ECE (10 equal-width bins)", c.get("ece")),
        ("mean score", c.get("mean_score")),
        ("positive rate", m.get("positive_rate")),
    ]
    return [
        f"## Evaluation on `{_md(ev['data'])}` ({ev['rows']:,} rows, {ev['positives']:,} positives)",
        "",
        "| metric | value |",
        "|---|---:|",
        *(f"| {name} | {fmt(v)} |" for name, v in rows),
        "",
        "| band | scores | rows | bads | bad rate |",
        "|---:|---|---:|---:|---:|",
        *(
            f"| {b['band']} | {b['low']:.4f} to {b['high']:.4f} | {b['rows']:,} | {b['bads']:,} | {b['bad_rate']:.4f} |"
            for b in k.get("bands", [])
        ),
        "",
    ]
