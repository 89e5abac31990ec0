"""Scores credit-risk teams read: ROC AUC, PR AUC (average precision) and the KS statistic."""

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from fedcli.errors import FedcliError


def score(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Metrics for labels y (0/1) and scores p; NaN where a metric needs both classes.

    Scores that are not finite mean the model itself is broken (weights overflowed): refused
    here, so a NaN never reaches a manifest or a table.
    """
    if not np.all(np.isfinite(p)):
        raise FedcliError(
            f"the model's scores are not finite ({int(np.sum(~np.isfinite(p)))} of {len(p)} rows): "
            "its weights overflowed",
            reason="not-finite",
        )
    if len(np.unique(y)) < 2:
        return {"auc": float("nan"), "pr_auc": float("nan"), "ks": float("nan")}
    fpr, tpr, _ = roc_curve(y, p)
    return {
        "auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "ks": float(np.max(tpr - fpr)),
    }
