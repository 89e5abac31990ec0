#!/usr/bin/env bash
# The fraud example on one machine: simulated card transactions at 4 banks, one coordinator, a shared folder.
# Usage: bash examples/fraud/demo.sh [WORKDIR] [ROUNDS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-demo-fraud}
rounds=${2:-3}
banks="bank-a bank-b bank-c bank-d"

rm -rf "$work" && mkdir -p "$work"
cd "$work"
echo "== 1. Data: simulated card transactions, 4 banks with different customers and fraud mixes + a later holdout"
# The sizes the spec template's preprocessing was drafted from (examples/fraud/federation.toml).
python "$here/simulate.py" --out data --customers 1000 --terminals 2000 --days 120 --seed 0

echo "== 2. Keys: every party makes its own; only .pub files are exchanged"
fedcli keygen coordinator --out coordinator
for b in $banks; do fedcli keygen "$b" --out "$b" >/dev/null; done

echo "== 3. Coordinator signs the spec (logreg on 30 features, Adam lr 1e-3, 5 epochs); the data section"
echo "   names the columns only (fedcli schema), and a statistics round fills their means and stds"
sed '/^# Declared preprocessing/,$d' "$here/federation.toml" > federation.toml
fedcli schema data/bank-a.csv --target is_fraud --positive 1 >> federation.toml
fedcli init store --spec federation.toml --key coordinator/coordinator.key \
  $(for b in $banks; do echo --member "$b/$b.pub"; done)

echo "== 4. Statistics round: each bank uploads signed counts, sums and sums of squares; round 0 follows"
for b in $banks; do
  fedcli stats submit --store store --key "$b/$b.key" --data "data/$b.csv" --coordinator coordinator/coordinator.pub \
    | sed 's/^/   /'
done
fedcli stats aggregate --store store --key coordinator/coordinator.key >/dev/null
echo "   published the federation's means and stds and round 0 (fedcli spec show store lists them)"

for r in $(seq 1 "$rounds"); do
  echo "== round $r: each bank trains on its own transactions, then the coordinator aggregates"
  for b in $banks; do
    # train prints what is in force on every run; init showed it above, so keep only the notes here
    log=$(fedcli train --store store --key "$b/$b.key" --data "data/$b.csv" --coordinator coordinator/coordinator.pub 2>&1 >/dev/null) \
      || { echo "$log" >&2; exit 1; }
    echo "   $b submitted"
    grep -v '^in force:' <<<"$log" | sed 's/^/     /' || true
  done
  fedcli aggregate --store store --key coordinator/coordinator.key
done

echo "== Status"
fedcli status store --coordinator coordinator/coordinator.pub
echo "== The federated model on the holdout (the last 30 days of every bank)"
fedcli evaluate --store store --coordinator coordinator/coordinator.pub --data data/test.csv
echo "== Federated vs each bank alone (same epochs, same holdout)"
python "$here/../compare_local.py" store coordinator/coordinator.pub data
echo "== Report: metrics per round per bank"
fedcli report store --out report.html --coordinator coordinator/coordinator.pub
echo "Open $work/report.html (or $work/report.png) to see the rounds."
