#!/usr/bin/env bash
# The whole federation on one machine: 4 banks, one coordinator, a shared folder.
# Usage: bash examples/demo.sh [WORKDIR] [ROUNDS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-demo}
rounds=${2:-5}
banks="bank-a bank-b bank-c bank-d"

rm -rf "$work" && mkdir -p "$work"
cd "$work"
echo "== 1. Data: public credit applications split across 4 banks (non-IID) + a holdout"
python "$here/prepare_credit.py" data

echo "== 2. Keys: every party makes its own; only .pub files are exchanged"
fedcli keygen coordinator --out coordinator
for b in $banks; do fedcli keygen "$b" --out "$b" >/dev/null; done

echo "== 3. Coordinator drafts the data section from column types only (fedcli schema) and signs the spec"
# The template's model and training settings; its declared means and stds are replaced by a
# statistics round, so no bank's statistics go into the spec (docs/data.md: federated statistics).
# Federated evaluation: each bank keeps 20% of its rows out of training and also scores a model
# trained on its own rows alone (docs/report.md).
sed '/^# Declared preprocessing/,$d' "$here/federation.toml" > federation.toml
fedcli schema data/bank-a.csv --target Status --positive bad >> federation.toml
printf '\n[evaluation]\nholdout = 0.2\nbaseline = true\n' >> federation.toml
fedcli init store --spec federation.toml --key coordinator/coordinator.key \
  $(for b in $banks; do echo --member "$b/$b.pub"; done)

echo "== 4. Statistics round: each bank uploads signed counts, sums and sums of squares; the coordinator"
echo "   publishes the federation's means, stds and levels, and round 0"
for b in $banks; do
  fedcli stats submit --store store --key "$b/$b.key" --data "data/$b.csv" --coordinator coordinator/coordinator.pub \
    | sed 's/^/   /'
done
fedcli stats aggregate --store store --key coordinator/coordinator.key

for r in $(seq 1 "$rounds"); do
  echo "== round $r: each bank trains on its own rows, then the coordinator aggregates"
  for b in $banks; do
    # train prints what is in force on every run; init showed it above, so keep only the notes here
    log=$(fedcli train --store store --key "$b/$b.key" --data "data/$b.csv" --coordinator coordinator/coordinator.pub 2>&1 >/dev/null) \
      || { echo "$log" >&2; exit 1; }
    echo "   $b submitted"
    grep -v '^in force:' <<<"$log" | sed 's/^/     /' || true
  done
  fedcli aggregate --store store --key coordinator/coordinator.key
done

echo "== Each bank scores the final global model on its holdout rows and publishes signed binned scores"
for b in $banks; do
  fedcli holdout --store store --key "$b/$b.key" --data "data/$b.csv" --coordinator coordinator/coordinator.pub 2>/dev/null \
    | sed "s/^/   $b: /"
done
echo "== Status (with the holdout of every global model, federation and per bank)"
fedcli status store --coordinator coordinator/coordinator.pub
echo "== The federated model on the shared holdout set"
fedcli evaluate --store store --coordinator coordinator/coordinator.pub --data data/test.csv
echo "== Federated vs each bank alone (same epochs, same training rows, same shared holdout)"
python "$here/compare_local.py" store coordinator/coordinator.pub data
echo "== Report: holdout metrics per round, calibration, score distributions, privacy budget, updates"
fedcli report store --out report.html --coordinator coordinator/coordinator.pub
echo "Open $work/report.html (or $work/report.png); docs/report.md says how to read it."
