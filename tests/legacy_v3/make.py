"""Writes the stores of tests/legacy_v3/ with the sidecar of commit ff6babb, the last code with
two ledgers (custom mode: `usage/ledger.py`, SQLite schema version 3; SaaS mode:
`usage/saas_ledger.py`, schema version 4 on SQLite and PostgreSQL).

Run with that commit's `sidecar` package first on the path, from the repository root:

    git archive ff6babb sidecar | tar -x -C OLD && PYTHONPATH=OLD:. python tests/legacy_v3/make.py

Every row is written by that code's own functions on its own stores, then dumped as SQL
(sqlite3's iterdump, pg_dump --inserts); the answers it gave each id are kept in answers.json,
so a test can check that a later ledger answers a repeat exactly as this one did. The clock is
the tests' fixed NOW (hour H0 = 500000): 3 hours before it an hour was sent; 2 hours before it
an hour was sealed and its requests stored (MeterUsage requests never sent, a BatchMeterUsage
call stored and never answered: a sender killed mid-call); the hour before NOW is open, with
decimal quantities, allocations, an anonymous record and one carried from the sealed hour.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import sidecar.usage.store as old_store
from sidecar.usage import saas

assert old_store.SCHEMA_VERSION == 3 and saas.SAAS_SCHEMA.version == 4, "run commit ff6babb"

from sidecar.usage import ledger, saas_ledger  # noqa: E402
from sidecar.usage.db import open_store  # noqa: E402
from sidecar.usage.hours import HourPolicy, hour_start, iso  # noqa: E402
from sidecar.usage.saas import SAAS_SCHEMA  # noqa: E402
from sidecar.usage.validate import Limits, parse, parse_saas  # noqa: E402

HERE = Path(__file__).parent
NOW = 1_800_000_000.0
H0 = 500_000
DIMS = ("scans", "users")
HP = HourPolicy(seal_margin=60, spread=600)
TEAM = [{"quantity": "1.25", "tags": {"team": "x"}}, {"quantity": 2, "tags": {"team": "y"}}]
ACCOUNTS = ("111111111111", "222222222222")


def arn(account: str) -> str:
    return f"arn:aws:license-manager::{account}:license:l-{account}"


def custom(directory: Path, answers: dict[str, Any]) -> str:
    store = old_store.Store(directory)
    limits = Limits(DIMS, max_age=24 * 3600)

    def ingest(doc: Any, now: float) -> None:
        records = parse(json.dumps(doc).encode(), limits, now)
        _, out = store.write(lambda c: ledger.ingest(c, records, now, HP))
        answers.update({a["id"]: a for a in out if not a["id"].startswith("u-")})

    def seal(through: int, now: float) -> None:
        store.write(lambda c: ledger.seal(c, through, now, HP, "prod-abc", lambda: 0.5))

    ingest({"dimension": "scans", "quantity": "2.5", "id": "sent-1"}, hour_start(H0 - 3) + 600)
    seal(H0 - 3, hour_start(H0 - 2) + 60)
    store.write(
        lambda c: ledger.finish(
            c, "scans", H0 - 3, "sent", hour_start(H0 - 2) + 400, record_id="m-1"
        )
    )
    ingest(
        [
            {"dimension": "scans", "quantity": "7.000001", "id": "s-1"},
            {"dimension": "users", "quantity": "3.25", "id": "t-1", "allocations": TEAM},
        ],
        hour_start(H0 - 2) + 600,
    )
    seal(H0 - 2, hour_start(H0 - 1) + 60)  # sealed, never sent: its requests are in `hours`
    ingest([{"dimension": "scans", "quantity": 5, "id": "a1"}], NOW - 120)
    ingest([{"dimension": "scans", "quantity": "0.5"}], NOW - 110)
    # For the sealed hour H0-2, after its seal: counted in H0-1, `carried_from` H0-2.
    ingest(
        [
            {
                "dimension": "scans",
                "quantity": 1,
                "id": "late-1",
                "timestamp": iso(hour_start(H0 - 2) + 900),
            }
        ],
        NOW - 100,
    )
    ingest(
        {
            "dimension": "users",
            "quantity": 4,
            "id": "t-2",
            "allocations": [{"quantity": 4, "tags": {"team": "y"}}],
        },
        NOW - 90,
    )
    store.close()
    conn = sqlite3.connect(directory / old_store.DB_NAME)
    try:
        return "\n".join(conn.iterdump()) + "\n"
    finally:
        conn.close()


def saas_store(store: Any, answers: dict[str, Any]) -> None:
    spec = saas_ledger.SealSpec(DIMS, "license", False, HP)
    limits = Limits(DIMS, max_age=24 * 3600)
    at = hour_start(H0 - 4)
    for i, account in enumerate(ACCOUNTS):
        answer: dict[str, Any] = {
            "CustomerAWSAccountId": account,
            "LicenseArn": arn(account),
            "ProductCode": "prod-abc",
        }
        if i == 0:
            answer["Metadata"] = {"AgreementId": "agmt-1111111111111111111111111"}
        digest = hashlib.sha256(f"token-{i}".encode()).hexdigest()
        customer = f"{account}/{arn(account)}"
        store.write(
            lambda db, a=answer, d=digest, k=customer: saas_ledger.save_customer(
                db, k, a, at, d, at + 3600
            )
        )

    def ingest(docs: list[tuple[str, dict[str, Any]]], now: float) -> None:
        body = [{"customer_aws_account_id": a, "license_arn": arn(a), **d} for a, d in docs]
        records = parse_saas(json.dumps(body).encode(), limits, now, "license")
        _, out = store.write(
            lambda db: saas_ledger.ingest(db, records, now, HP, accept_unresolved=False),
            locks=saas_ledger.ingest_locks(records),
        )
        answers.update({a["id"]: a for a in out if not a["id"].startswith("u-")})

    def seal(through: int, now: float) -> None:
        store.write(
            lambda db: saas_ledger.seal(db, through, now, spec), locks=saas_ledger.SEAL_LOCKS
        )

    ingest(
        [(ACCOUNTS[0], {"dimension": "scans", "quantity": "2.5", "id": "k-0"})],
        hour_start(H0 - 3) + 600,
    )
    seal(H0 - 3, hour_start(H0 - 2) + 60)
    at = hour_start(H0 - 2) + 120
    batch, _ = store.write(lambda db: saas_ledger.next_batch(db, at, None))
    response = {
        "Results": [
            {"UsageRecord": r, "Status": "Success", "MeteringRecordId": "m-0"}
            for r in batch.request["UsageRecords"]
        ],
        "UnprocessedRecords": [],
    }
    store.write(lambda db: saas_ledger.answer(db, batch.id, response, at + 1))
    ingest(
        [
            (ACCOUNTS[0], {"dimension": "scans", "quantity": "7.000001", "id": "k-1"}),
            (ACCOUNTS[1], {"dimension": "users", "quantity": 3, "id": "k-2"}),
        ],
        hour_start(H0 - 2) + 600,
    )
    seal(H0 - 2, hour_start(H0 - 1) + 60)
    # The call for hour H0-2 is stored and never answered: a sender killed mid-call.
    at = hour_start(H0 - 1) + 120
    store.write(lambda db: saas_ledger.next_batch(db, at, None))
    ingest([(ACCOUNTS[0], {"dimension": "scans", "quantity": 5, "id": "k-3"})], NOW - 120)
    ingest([(ACCOUNTS[1], {"dimension": "scans", "quantity": "0.25"})], NOW - 110)
    ingest(
        [(ACCOUNTS[0], {"dimension": "scans", "quantity": 1, "id": "k-late",
                        "timestamp": iso(hour_start(H0 - 2) + 900)})],
        NOW - 100,
    )  # fmt: skip
    store.close()


def main() -> None:
    answers: dict[str, dict[str, Any]] = {"custom": {}, "saas_sqlite": {}, "saas_postgresql": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "custom").mkdir()
        (HERE / "custom.sql").write_text(custom(root / "custom", answers["custom"]))
        (root / "saas").mkdir()
        saas_store(open_store(SAAS_SCHEMA, state_dir=root / "saas"), answers["saas_sqlite"])
        conn = sqlite3.connect(root / "saas" / SAAS_SCHEMA.name)
        (HERE / "saas_sqlite.sql").write_text("\n".join(conn.iterdump()) + "\n")
        conn.close()
    sys.path.append(str(HERE.parent.parent))
    from tests.pg import PgServer

    server = PgServer()
    try:
        url = server.new_database()
        saas_store(open_store(SAAS_SCHEMA, database_url=url), answers["saas_postgresql"])
        dump = server._run("pg_dump", "--inserts", "--no-owner", "--no-privileges", "-d", url)
        lines = [line for line in dump.stdout.splitlines() if not line.startswith("\\")]
        (HERE / "saas_postgresql.sql").write_text("\n".join(lines) + "\n")
    finally:
        server.close()
    (HERE / "answers.json").write_text(json.dumps(answers, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
