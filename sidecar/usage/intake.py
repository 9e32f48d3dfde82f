"""What a POST /v1/usage is answered, in both modes (custom's ledger and SaaS's write the same
answers): one record's answer (the hour it counts in, and why when it was carried), the 409 of
an id sent again with other content, and the POST's body. Pure."""

from __future__ import annotations

import threading
from typing import Any

from sidecar.core import quantity as qty
from sidecar.usage.hours import iso_hour


class IdConflictError(Exception):
    """An idempotency key came back with different content (HTTP 409)."""

    def __init__(self, field: str, key: str) -> None:
        super().__init__(f"id {key!r} was used before for different usage")
        self.field = field
        self.key = key

    def body(self) -> dict[str, Any]:
        return {"error": "id_conflict", "field": self.field, "message": str(self)}


def record_answer(
    rid: str, dimension: str, micros: int, hour: int, own: int, customer: str | None = None
) -> dict[str, Any]:
    """A stored record's answer: it counts in `hour`; `own` is the hour it happened in (another
    one when that hour was sealed or too old to send)."""
    answer: dict[str, Any] = {"id": rid}
    if customer is not None:
        answer["customer"] = customer
    answer.update(dimension=dimension, quantity=qty.to_json(micros), hour=iso_hour(hour))
    if own != hour:
        answer["carried_from"] = iso_hour(own)
        answer["note"] = (
            f"hour {iso_hour(own)} is already sealed or too old to send; "
            f"counted in {iso_hour(hour)}"
        )
    return answer


def accepted(
    status: int, answers: list[dict[str, Any]], units: dict[str, int], lock: threading.Lock
) -> tuple[int, dict[str, Any]]:
    """The POST's answer; the new records' micro-units are added to `units` (per dimension,
    the accepted-units counter), repeats are not."""
    fresh = [a for a in answers if not a.get("repeat")]
    with lock:
        for a in fresh:
            units[a["dimension"]] = units.get(a["dimension"], 0) + qty.parse(a["quantity"])
    return status, {
        "accepted": len(fresh),
        "repeats": len(answers) - len(fresh),
        "records": answers,
    }
