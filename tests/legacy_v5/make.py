"""Writes the SaaS stores of tests/legacy_v5/ with the sidecar of commit 62bf24a, the last code
whose SaaS ledger keeps no tag sets (`usage/saas_ledger.py`, schema version 5 on SQLite and
PostgreSQL; schema 6 adds the tag set to the open totals).

Run with that commit's `sidecar` package first on the path, from the repository root:

    git archive 62bf24a sidecar | tar -x -C OLD && PYTHONPATH=OLD:. python tests/legacy_v5/make.py

Every row is written by that code's own functions on its own stores, then dumped as SQL
(sqlite3's iterdump, pg_dump --inserts); the answers it gave each id are kept in answers.json,
so a test can check that a later ledger answers a repeat exactly as this one did. The clock is
the tests' fixed NOW (hour H0 = 500000): 3 hours before it an hour was sent; 2 hours before it
an hour was sealed and its BatchMeterUsage call stored and never answered (a sender killed
mid-call); the hour before NOW is open, with decimal quantities, an anonymous record and one
carried from the sealed hour.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from sidecar.usage import saas

assert saas.SAAS_SCHEMA.version == 5, "run commit 62bf24a"

from sidecar.usage import saas_ledger  # noqa: E402
from sidecar.usage.db import open_store  # noqa: E402
from sidecar.usage.hours import HourPolicy, hour_start, iso  # noqa: E402
from sidecar.usage.saas import SAAS_SCHEMA  # noqa: E402
from sidecar.usage.validate import Limits, parse_saas  # noqa: E402

HERE = Path(__file__).parent
NOW = 1_800_000_000.0
H0 = 500_000
DIMS = ("scans", "users")
HP = HourPolicy(seal_margin=60, spread=600)
ACCOUNTS = ("111111111111", "222222222222")


def arn(account: str) -> str:
    return f"arn:aws:license-manager::{account}:license:l-{account}"


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
    answers: dict[str, dict[str, Any]] = {"saas_sqlite": {}, "saas_postgresql": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
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
