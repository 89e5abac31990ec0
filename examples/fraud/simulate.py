"""Synthetic card transactions with fraud, split over banks: the offline data for the fraud example.

The design follows the transaction simulator of the Fraud Detection Handbook (Le Borgne et al.,
"Reproducible Machine Learning for Credit Card Fraud Detection - Practical Handbook", chapter 3),
written from its description with vectorised numpy so that ten million transactions take seconds:

* customers live at a random point of a 100 x 100 square, with a mean amount ~ U(5, 100), a standard
  deviation of half that mean, and a mean number of transactions per day ~ U(0, 4);
* terminals live at a random point of the same square; a customer uses the terminals within `radius`;
* each day a customer makes Poisson(mean per day) transactions at times ~ N(noon, 20000 s) (times outside
  the day are dropped), of amount N(mean, std) (a negative draw is replaced by U(0, 2 * mean)), each at a
  terminal drawn uniformly from the customer's terminals;
* three fraud scenarios, applied in this order (a later one overrides the scenario label):
  1. any amount above 220 is a fraud (a rule-based baseline any model must find);
  2. compromised terminals: each day some terminals are compromised, and every transaction on them in
     the next 28 days (the day itself included) is a fraud;
  3. compromised cards: each day some customers' cards are compromised, and in the next 14 days each of
     their transactions is, with probability 1/3, a fraud with its amount multiplied by 5.

Then each transaction gets the 30 numeric features of `FEATURES` (the model is Linear(30, 1)), computed
with cumulative sums over time-sorted arrays, and the customers are split over banks by where they live,
each bank with its own fraud mix (`PROFILES`). Terminal features use only frauds known by then: a fraud
is reported `DELAY_DAYS` after it happens. See docs/fraud.md.

    python examples/fraud/simulate.py --out data [--customers 5000 --terminals 10000 --days 183 --seed 0 --banks 4]

writes data/bank-a.csv ... (one per bank: the days before the holdout) and data/test.csv (the last
`--test-days` days of every bank), with exactly the 30 feature columns and `is_fraud` (0/1).
"""

from __future__ import annotations

import argparse
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

DAY = 86_400  # seconds
START = np.datetime64("2018-04-01")  # the Handbook's first day (a Sunday)
SIDE = 100.0  # customers and terminals live in [0, SIDE)^2
DELAY_DAYS = 7  # a fraud becomes known (reported, investigated) this many days after it happens
WINDOWS = (1, 7, 30)  # days
FRAUD_AMOUNT = 220.0  # scenario 1
TERMINAL_DAYS, CARD_DAYS = 28, 14  # how long a compromise lasts (scenarios 2 and 3)
CARD_SHARE, CARD_FACTOR = 1 / 3, 5.0  # scenario 3: share of a compromised card's transactions, amount factor
# The Handbook's daily compromises: 2 of its 10,000 terminals and 3 of its 5,000 customers, kept as rates
# so that the fraud rate does not depend on the size asked for.
# The banks' terminal_risk and card_risk only move these compromises between regions, not add to them.
TERMINAL_RATE = 2 / 10_000  # compromised terminals per terminal per day
CARD_RATE = 3 / 5_000  # compromised cards per customer per day
TARGET = "is_fraud"

FEATURES = (
    # the transaction itself (8)
    "amount",
    "log_amount",  # log(1 + amount)
    "is_weekend",  # 0/1, Saturday or Sunday
    "is_night",  # 0/1, hour <= 6 (the Handbook's definition)
    "hour_sin",
    "hour_cos",  # time of day on a circle (23:59 is next to 00:00)
    "dow_sin",
    "dow_cos",  # day of week on a circle
    # the customer's (card's) own history, this transaction included, windows (t - w, t] (13)
    "cust_nb_tx_1d",
    "cust_nb_tx_7d",
    "cust_nb_tx_30d",
    "cust_avg_amount_1d",
    "cust_avg_amount_7d",
    "cust_avg_amount_30d",
    "cust_amount_ratio_1d",  # amount / cust_avg_amount_1d
    "cust_amount_ratio_7d",
    "cust_amount_ratio_30d",
    "cust_sum_amount_1d",  # spend in the last 24 hours
    "cust_std_amount_30d",
    "cust_amount_zscore_30d",  # (amount - avg) / (std + 1), over 30 days
    "cust_log_hours_since_prev",  # log(1 + hours since the card's previous transaction), capped at 30 days
    # the terminal's history as this bank saw it, over (t - 7 - w, t - 7] days: only reported frauds (9)
    "term_nb_tx_1d",
    "term_nb_tx_7d",
    "term_nb_tx_30d",
    "term_nb_fraud_1d",
    "term_nb_fraud_7d",
    "term_nb_fraud_30d",
    "term_risk_1d",  # term_nb_fraud / term_nb_tx (0 when no transaction)
    "term_risk_7d",
    "term_risk_30d",
)
assert len(FEATURES) == 30


@dataclass(frozen=True)
class Profile:
    """What makes a bank's customers and frauds differ from the others' (non-IID on purpose)."""

    kind: str
    terminal_risk: float  # relative chance that a terminal in this bank's region is the one compromised
    card_risk: float  # relative chance that one of this bank's cards is the one compromised
    amount_high: float  # customers' mean amount ~ U(5, amount_high)


# Bank i gets PROFILES[i % 4]. Bank a (the western half of the map) is the large retail bank.
PROFILES = (
    Profile("retail, the Handbook's mix", 1.0, 1.0, 100.0),
    Profile("skimming hot spot: mostly compromised terminals", 5.0, 0.25, 100.0),
    Profile("online: mostly compromised cards", 0.2, 5.0, 100.0),
    Profile("premium: larger amounts, more frauds above 220", 1.0, 1.0, 120.0),
)


def bank_names(banks: int) -> list[str]:
    return [f"bank-{string.ascii_lowercase[i]}" for i in range(banks)]


def region(x: np.ndarray, y: np.ndarray, banks: int) -> np.ndarray:
    """Bank index of a location: bank 0 has the western half; the others share the eastern half in
    horizontal bands of widths banks-1 : banks-2 : ... : 1 (so every bank has a different size)."""
    if banks == 1:
        return np.zeros(len(x), dtype=np.int8)
    widths = np.arange(banks - 1, 0, -1, dtype=float)
    cuts = SIDE * np.cumsum(widths)[:-1] / widths.sum()
    band = 1 + np.searchsorted(cuts, y, side="right")
    return np.where(x < SIDE / 2, 0, band).astype(np.int8)


def customer_profiles(n: int, banks: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Location, bank, mean/std amount and mean transactions per day of n customers."""
    x, y = rng.uniform(0, SIDE, n), rng.uniform(0, SIDE, n)
    bank = region(x, y, banks)
    high = np.array([PROFILES[b % len(PROFILES)].amount_high for b in range(banks)])[bank]
    mean_amount = rng.uniform(5, high)
    return {
        "x": x,
        "y": y,
        "bank": bank,
        "mean_amount": mean_amount,
        "std_amount": mean_amount / 2,
        "tx_per_day": rng.uniform(0, 4, n),
    }


def terminal_profiles(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": rng.uniform(0, SIDE, n), "y": rng.uniform(0, SIDE, n)}


def terminals_within(cust: dict, term: dict, radius: float, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Each customer's terminals within `radius`, as CSR (indptr, terminal ids sorted per customer).

    Terminals are bucketed into a grid of cells of side `radius`; a customer's candidates are the 3 x 3
    cells around it, expanded without a Python loop per customer, in chunks of customers."""
    cells = max(1, int(np.ceil(SIDE / radius)))

    def cell(v):
        return np.minimum((v / radius).astype(np.int64), cells - 1)

    tcell = cell(term["x"]) * cells + cell(term["y"])
    order = np.argsort(tcell, kind="stable")
    starts = np.searchsorted(tcell[order], np.arange(cells * cells + 1))
    cx, cy = cell(cust["x"]), cell(cust["y"])
    r2 = radius * radius
    counts = np.zeros(len(cx), dtype=np.int64)
    found = []
    for lo in range(0, len(cx), chunk):
        idx = np.arange(lo, min(lo + chunk, len(cx)))
        pairs_c, pairs_t = [], []
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                gx, gy = cx[idx] + dx, cy[idx] + dy
                ok = (gx >= 0) & (gx < cells) & (gy >= 0) & (gy < cells)
                g = np.where(ok, gx * cells + gy, 0)
                first, n = starts[g], np.where(ok, starts[g + 1] - starts[g], 0)
                c = np.repeat(idx, n)
                # position k of candidate j of customer i: first[i] + j
                offs = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
                t = order[np.repeat(first, n) + offs]
                near = (cust["x"][c] - term["x"][t]) ** 2 + (cust["y"][c] - term["y"][t]) ** 2 <= r2
                pairs_c.append(c[near])
                pairs_t.append(t[near])
        c, t = np.concatenate(pairs_c), np.concatenate(pairs_t)
        srt = np.lexsort((t, c))
        found.append(t[srt].astype(np.int32))
        counts[idx] = np.bincount(c - lo, minlength=len(idx))
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return indptr, np.concatenate(found) if found else np.zeros(0, np.int32)


def transactions(cust: dict, indptr: np.ndarray, terms: np.ndarray, days: int, rng: np.random.Generator) -> dict:
    """Every customer's transactions over `days` days, sorted by time (ties keep generation order)."""
    n_cust = len(cust["x"])
    per_day = rng.poisson(np.repeat(cust["tx_per_day"], days)).astype(np.int64)  # customer-major, day-minor
    flat = np.repeat(np.arange(n_cust * days, dtype=np.int64), per_day)
    customer, day = flat // days, flat % days
    del flat, per_day
    secs = np.rint(rng.normal(DAY / 2, 20_000, len(customer))).astype(np.int64)
    amount = rng.normal(cust["mean_amount"][customer], cust["std_amount"][customer])
    redraw = rng.uniform(0, 2 * cust["mean_amount"][customer])
    amount = np.round(np.where(amount < 0, redraw, amount), 2)
    degree = np.diff(indptr)[customer]
    pick = np.floor(rng.uniform(0, 1, len(customer)) * degree).astype(np.int64)
    keep = (secs >= 0) & (secs < DAY) & (degree > 0)  # as in the Handbook: no terminal nearby, no transaction
    terminal = terms[np.minimum(indptr[customer] + pick, len(terms) - 1)][keep] if len(terms) else pick[keep]
    customer, day, secs, amount = customer[keep], day[keep], secs[keep], amount[keep]
    t = day * DAY + secs
    order = np.argsort(t, kind="stable")
    return {
        "tx_time": t[order],
        "customer": customer[order].astype(np.int32),
        "terminal": terminal[order].astype(np.int32),
        "amount": amount[order],
    }


def _covered(event_id, event_day, tx_id, tx_day, length):
    """Whether each transaction falls within `length` days from a compromise event of its own id
    (card or terminal) that started on or before its day: the latest such event decides."""
    if len(event_id) == 0 or len(tx_id) == 0:
        return np.zeros(len(tx_id), dtype=bool)
    span = int(max(event_day.max(), tx_day.max())) + 1
    keys = np.sort(event_id.astype(np.int64) * span + event_day)
    probe = tx_id.astype(np.int64) * span + tx_day
    i = np.searchsorted(keys, probe, side="right") - 1
    latest = keys[np.maximum(i, 0)]
    return (i >= 0) & (latest // span == tx_id) & (tx_day - latest % span < length)


def add_frauds(tx: dict, cust: dict, term: dict, days: int, banks: int, rng: np.random.Generator) -> None:
    """Label the frauds of the three scenarios in place: `is_fraud` (0/1), `scenario` (0 for genuine)."""
    profiles = [PROFILES[b % len(PROFILES)] for b in range(banks)]
    day = tx["tx_time"] // DAY
    scenario = np.where(tx["amount"] > FRAUD_AMOUNT, 1, 0).astype(np.int8)

    # 2. compromised terminals, drawn each day with weights by the region the terminal is in
    tw = np.array([p.terminal_risk for p in profiles])[region(term["x"], term["y"], banks)]
    n = rng.poisson(TERMINAL_RATE * len(tw) * days)
    ev_day, ev_term = rng.integers(0, days, n), rng.choice(len(tw), n, p=tw / tw.sum())
    scenario[_covered(ev_term, ev_day, tx["terminal"], day, TERMINAL_DAYS)] = 2

    # 3. compromised cards, drawn each day with weights by the customer's bank
    cw = np.array([p.card_risk for p in profiles])[cust["bank"]]
    n = rng.poisson(CARD_RATE * len(cw) * days)
    ev_day, ev_cust = rng.integers(0, days, n), rng.choice(len(cw), n, p=cw / cw.sum())
    hit = _covered(ev_cust, ev_day, tx["customer"], day, CARD_DAYS) & (rng.uniform(0, 1, len(day)) < CARD_SHARE)
    tx["amount"] = np.where(hit, np.round(tx["amount"] * CARD_FACTOR, 2), tx["amount"])
    scenario[hit] = 3

    tx["scenario"] = scenario
    tx["is_fraud"] = (scenario > 0).astype(np.int8)


def _group_key(group: np.ndarray, t: np.ndarray) -> np.ndarray:
    """One int64 per row ordering by (group, t), with groups spaced so that no window (at most
    DELAY_DAYS + the longest window) reaches from one group into the previous one."""
    span = (int(t.max()) if len(t) else 0) + (DELAY_DAYS + max(WINDOWS)) * DAY + 1
    return group.astype(np.int64) * span + t


def _windows(key: np.ndarray, values: list[np.ndarray], lag: int, window: int):
    """For rows sorted by `key` (see _group_key): the count and the sums of `values` over the rows of the
    same group with time in (t - lag - window, t - lag]. With lag 0 the row itself is in and later rows
    with the same time are not (like a pandas time-based rolling window); with lag > 0 the window ends
    `lag` seconds before t. Prefix sums in the values' own dtype: integer sums are exact."""
    end = np.arange(1, len(key) + 1) if lag == 0 else np.searchsorted(key, key - lag, side="right")
    start = np.minimum(np.searchsorted(key, key - lag - window, side="right"), end)
    sums = []
    for v in values:
        cum = np.zeros(len(v) + 1, dtype=np.int64 if v.dtype.kind in "iub" else np.float64)
        np.cumsum(v, out=cum[1:])
        sums.append(cum[end] - cum[start])
        del cum
    return end - start, sums


MONEY = {"amount", "cust_avg_amount_1d", "cust_avg_amount_7d", "cust_avg_amount_30d"}
MONEY |= {"cust_sum_amount_1d", "cust_std_amount_30d"}


def _compact(name: str, v: np.ndarray) -> np.ndarray:
    """Counts as int32, flags as int8, money in float64 rounded to cents, the rest float32."""
    if v.dtype.kind in "iub":
        return v.astype(np.int8 if v.dtype in (np.int8, np.bool_) else np.int32)
    if name in MONEY:
        return np.round(v, 2)
    return v.astype(np.float32)


def features(tx: dict, bank: np.ndarray, n_terminals: int) -> dict[str, np.ndarray]:
    """The 30 FEATURES of every transaction, in tx order. Customer features use the card's history;
    terminal features use only the transactions of the same bank (a bank sees its own cardholders, not
    the other banks') whose fraud label was known DELAY_DAYS before the transaction. Each feature is
    stored compact and in tx order as soon as it is computed, to keep the peak memory low."""
    t, amount = tx["tx_time"], tx["amount"]
    out: dict[str, np.ndarray] = {}

    def put(name: str, values: np.ndarray, perm: np.ndarray | None = None) -> None:
        values = _compact(name, values)
        if perm is not None:
            back = np.empty_like(values)
            back[perm] = values
            values = back
        out[name] = values

    dow = (int((START - np.datetime64("1970-01-01")).astype(int)) + t // DAY + 3) % 7  # Monday = 0
    angle = (2 * np.pi / DAY) * (t % DAY)
    put("amount", amount)
    put("log_amount", np.log1p(amount))
    put("is_weekend", dow >= 5)
    put("is_night", t % DAY // 3600 <= 6)
    put("hour_sin", np.sin(angle))
    put("hour_cos", np.cos(angle))
    put("dow_sin", np.sin(2 * np.pi / 7 * dow))
    put("dow_cos", np.cos(2 * np.pi / 7 * dow))
    del dow, angle

    order = np.argsort(tx["customer"], kind="stable")  # tx is time-sorted: this sorts by (customer, time)
    c, ts, a = tx["customer"][order], t[order], amount[order]
    key = _group_key(c, ts)
    cents = np.rint(a * 100).astype(np.int64)
    first = np.flatnonzero(np.concatenate([[True], c[1:] != c[:-1]]))
    # squares of (amount - the card's first amount): the same variance, far smaller prefix sums
    shifted = a - np.repeat(a[first], np.diff(np.append(first, len(c))))
    for w in WINDOWS:
        n, (total, lin, squares) = _windows(key, [cents, shifted, shifted * shifted], 0, w * DAY)
        avg = total / n / 100
        put(f"cust_nb_tx_{w}d", n, order)
        put(f"cust_avg_amount_{w}d", avg, order)
        put(f"cust_amount_ratio_{w}d", a / np.maximum(avg, 0.01), order)
        if w == 1:
            put("cust_sum_amount_1d", total / 100, order)
        if w == 30:
            std = np.where(n > 1, np.sqrt(np.maximum(squares / n - (lin / n) ** 2, 0.0)), 0.0)
            put("cust_std_amount_30d", std, order)
            put("cust_amount_zscore_30d", (a - avg) / (std + 1.0), order)
        del n, total, lin, squares, avg
    gap = np.full(len(c), 30.0 * 24)
    same = c[1:] == c[:-1]
    gap[1:][same] = np.minimum((ts[1:] - ts[:-1])[same] / 3600, 30.0 * 24)
    put("cust_log_hours_since_prev", np.log1p(gap), order)
    del order, c, ts, a, key, cents, shifted, gap, same

    g = bank.astype(np.int64) * n_terminals + tx["terminal"]
    order = np.argsort(g, kind="stable")  # by (bank, terminal, time)
    key = _group_key(g[order], t[order])
    fraud = tx["is_fraud"][order]
    del g
    for w in WINDOWS:
        n, (frauds,) = _windows(key, [fraud], DELAY_DAYS * DAY, w * DAY)
        put(f"term_nb_tx_{w}d", n, order)
        put(f"term_nb_fraud_{w}d", frauds, order)
        put(f"term_risk_{w}d", np.where(n > 0, frauds / np.maximum(n, 1), 0.0), order)
    return {name: out[name] for name in FEATURES}


def simulate(
    customers: int = 5000,
    terminals: int = 10_000,
    days: int = 183,
    banks: int = 4,
    rng: np.random.Generator | None = None,
    radius: float = 5.0,
) -> pd.DataFrame:
    """All transactions with their features, `is_fraud`, and the columns that explain them
    (`tx_time` in seconds from START, `day`, `customer`, `terminal`, `bank`, `scenario`), in time order."""
    if not (1 <= banks <= 26 and customers >= 1 and terminals >= 1 and days >= 1 and radius > 0):
        raise ValueError("need 1-26 banks, at least one customer, terminal and day, and a positive radius")
    rng = rng if rng is not None else np.random.default_rng(0)
    cust = customer_profiles(customers, banks, rng)
    term = terminal_profiles(terminals, rng)
    indptr, near = terminals_within(cust, term, radius)
    tx = transactions(cust, indptr, near, days, rng)
    if len(tx["tx_time"]) == 0:
        raise ValueError("no transaction was simulated: ask for more customers, terminals or days")
    add_frauds(tx, cust, term, days, banks, rng)
    bank = cust["bank"][tx["customer"]]
    del cust, term, indptr, near
    columns = features(tx, bank, terminals)
    columns[TARGET] = tx["is_fraud"]
    columns["tx_time"] = tx["tx_time"]
    columns["day"] = (tx["tx_time"] // DAY).astype(np.int32)
    columns["customer"], columns["terminal"] = tx["customer"], tx["terminal"]
    columns["bank"], columns["scenario"] = bank, tx["scenario"]
    return pd.DataFrame(columns, copy=False)


def check_days(days: int, test_days: int) -> tuple[int, int]:
    """The first day left out of the banks' files and the first day of the holdout."""
    holdout = days - test_days
    if test_days < 1 or holdout - DELAY_DAYS < 1:
        raise ValueError(
            f"--days {days} leaves no training day before a {test_days}-day holdout and the {DELAY_DAYS}-day delay"
        )
    return holdout - DELAY_DAYS, holdout


def split(frame: pd.DataFrame, days: int, banks: int, test_days: int) -> dict[str, np.ndarray]:
    """Row positions of each bank's table (its days before the holdout) and of `test` (the last
    `test_days` days of every bank). The DELAY_DAYS before the holdout are in neither: their labels are
    not known yet when the banks train, so the holdout starts strictly after everything a model could
    learn from."""
    train_end, holdout = check_days(days, test_days)
    day, bank = frame["day"].to_numpy(), frame["bank"].to_numpy()
    parts = {name: np.flatnonzero((bank == b) & (day < train_end)) for b, name in enumerate(bank_names(banks))}
    parts["test"] = np.flatnonzero(day >= holdout)
    return parts


def write_table(frame: pd.DataFrame, path: Path, rows: np.ndarray | None = None) -> Path:
    """Write exactly the model's columns (FEATURES, then TARGET) of `rows` (default: all). The one place
    that knows the file format: Parquet when the name ends in .parquet (typed columns, 100,000-row row
    groups), else CSV."""
    columns = [frame[c].to_numpy() for c in (*FEATURES, TARGET)]
    rows = np.arange(len(frame)) if rows is None else rows
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({name: c[rows] for name, c in zip((*FEATURES, TARGET), columns, strict=True)})
        pq.write_table(table, path, row_group_size=100_000)
        return path
    with open(path, "wb") as f:
        f.write((",".join((*FEATURES, TARGET)) + "\n").encode())
        for lo in range(0, len(rows), 30_000):  # small chunks: temporaries stay below mmap size
            f.write(csv_rows([c[rows[lo : lo + 30_000]] for c in columns]))
    return path


def csv_rows(columns: list[np.ndarray]) -> bytes:
    """CSV lines of equal-length numeric columns, several times faster than DataFrame.to_csv (which made
    writing most of the run time). Integers are written as such, float64 with 2 decimals (money), float32
    with 6, trailing zeros dropped ("1.5", "1", "-0.25"). Every character position of every column is a
    row vector of characters plus a mask of the rows that print it; the masked row-major matrix is the text."""
    rows = len(columns[0]) if columns else 0
    if not rows:
        return b""
    chars, keep = [], []
    everyone = np.ones(rows, dtype=bool)
    for i, v in enumerate(columns):
        decimals = 0 if v.dtype.kind in "iub" else 2 if v.dtype == np.float64 else 6
        if not np.all(np.isfinite(v)):
            raise ValueError("csv_rows writes finite numbers only")
        q = np.rint(np.abs(v.astype(np.float64)) * 10.0**decimals).astype(np.int64)
        whole, frac = np.divmod(q, 10**decimals)
        width = len(str(int(whole.max())))
        chars.append(np.full(rows, ord("-"), np.uint8))
        keep.append((v < 0) & (q > 0))
        for k in range(width - 1, -1, -1):  # the integer part, no leading zeros
            chars.append((whole // 10**k % 10 + ord("0")).astype(np.uint8))
            keep.append(whole >= 10**k if k else everyone)
        if decimals:  # ".", then the fraction without trailing zeros
            chars.append(np.full(rows, ord("."), np.uint8))
            keep.append(frac > 0)
            for k in range(decimals - 1, -1, -1):
                chars.append((frac // 10**k % 10 + ord("0")).astype(np.uint8))
                keep.append(frac % 10 ** (k + 1) > 0)
        chars.append(np.full(rows, ord("\n" if i == len(columns) - 1 else ","), np.uint8))
        keep.append(everyone)
    text = np.ascontiguousarray(np.stack(chars).T)
    return text[np.stack(keep).T].tobytes()


def summary(frame: pd.DataFrame, parts: dict[str, np.ndarray], suffix: str = ".csv") -> list[dict]:
    """Rows, frauds, fraud rate, frauds per scenario and days of every file."""
    fraud, scenario, day = (frame[c].to_numpy() for c in (TARGET, "scenario", "day"))
    out = []
    for name, rows in parts.items():
        counts = np.bincount(scenario[rows], minlength=4)
        out.append(
            {
                "file": name + suffix,
                "rows": len(rows),
                "frauds": int(fraud[rows].sum()),
                "fraud_rate": float(fraud[rows].mean()) if len(rows) else 0.0,
                **{f"s{k}": int(counts[k]) for k in (1, 2, 3)},
                "days": f"{day[rows].min()}-{day[rows].max()}" if len(rows) else "-",
            }
        )
    return out


def print_summary(rows: list[dict], generated: int, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{generated:,} transactions simulated in {seconds:.1f} s; written:")
    for col in ("file", "rows", "frauds", "fraud %", ">220", "terminal", "card", "days"):
        table.add_column(col, justify="left" if col == "file" else "right")
    for r in rows:
        frauds = max(r["frauds"], 1)
        table.add_row(
            r["file"],
            f"{r['rows']:,}",
            f"{r['frauds']:,}",
            f"{100 * r['fraud_rate']:.2f}",
            *[f"{100 * r[f's{k}'] / frauds:.0f}%" for k in (1, 2, 3)],
            r["days"],
        )
    Console().print(table)
    print(">220 / terminal / card: share of the file's frauds from scenario 1 (amount), 2, 3")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for bank-*.csv and test.csv")
    ap.add_argument("--format", choices=("csv", "parquet"), default="csv", help="file format (default csv)")
    ap.add_argument("--customers", type=int, default=5000, help="cards (default 5000)")
    ap.add_argument("--terminals", type=int, default=10_000, help="terminals (default 10000)")
    ap.add_argument("--days", type=int, default=183, help="days simulated from 2018-04-01 (default 183)")
    ap.add_argument("--test-days", type=int, default=30, help="holdout: the last days of every bank (default 30)")
    ap.add_argument("--banks", type=int, default=4, help="banks, split by where customers live (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="random seed, >= 0 (default 0)")
    args = ap.parse_args(argv)
    if args.seed < 0:
        ap.error("--seed must be >= 0")
    began = time.perf_counter()
    try:
        check_days(args.days, args.test_days)
        frame = simulate(args.customers, args.terminals, args.days, args.banks, np.random.default_rng(args.seed))
    except ValueError as e:
        ap.error(str(e))
    parts = split(frame, args.days, args.banks, args.test_days)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, rows in parts.items():
            write_table(frame, args.out / f"{name}.{args.format}", rows)
    except OSError as e:
        sys.exit(f"simulate.py: cannot write to {args.out}: {e.strerror or e}")
    rows = summary(frame, parts, f".{args.format}")
    print_summary(rows, len(frame), time.perf_counter() - began)
    for r in rows:
        if r["frauds"] in (0, r["rows"]):
            print(
                f"warning: {r['file']} has a single class; fedcli train and evaluate refuse it: "
                "simulate more customers or days",
                file=sys.stderr,
            )


if __name__ == "__main__":
    main()
