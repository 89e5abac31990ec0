"""The point of federating: the shared model beats what the banks train alone."""

from compare_local import compare
from helpers import BANKS


def test_federated_beats_average_local_only_auc(fed):
    for _ in range(5):
        for b in BANKS:
            fed.train(b)
        fed.aggregate()
    res = compare(str(fed.store), str(fed.pub("coordinator")), fed.data)
    local = [m["auc"] for name, m in res.items() if name != "federated"]
    assert len(local) == len(BANKS)
    assert res["federated"]["auc"] > sum(local) / len(local)
    assert res["federated"]["auc"] > 0.8
