"""The usage POST's CPU path: its shortcuts answer exactly as the slow paths they skip.

The API thread passes bodies that can hold neither a lone surrogate nor deep nesting without
parsing them twice (`body_problem`), and the validator reads a body opening with `{` or `[` as
UTF-8 directly. Each shortcut is checked two ways: it is taken (a plain body is never parsed by
`body_problem`), and whatever it is given, hostile input included, the answer is the slow path's.
Request heads stay with the standard library's parser: a copy of it would miss its fixes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.server.api import API_LIMITS, LocalServer, Router, body_problem
from sidecar.usage.service import UsagePolicy, UsageService
from sidecar.usage.validate import Limits, RejectedError, parse


def test_body_problem_parses_only_bodies_that_may_hold_a_problem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Plain bodies pass unparsed; a surrogate, a `\\u` escape, non-ASCII text or many brackets
    are parsed and judged as before."""
    parsed: list[bytes] = []
    real = json.loads

    def counted(body: Any, **kw: Any) -> Any:
        parsed.append(body)
        return real(body, **kw)

    monkeypatch.setattr(json, "loads", counted)
    plain = json.dumps([{"dimension": "scans", "quantity": 1, "id": f"r{i}"} for i in range(25)])
    assert body_problem(plain.encode()) is None
    assert parsed == []
    lone = body_problem(b'{"id": "\\ud800"}')
    assert lone is not None and lone.status == 400 and "surrogate" in str(lone.body)
    deep = body_problem(b"[" * 5000 + b"]" * 5000)
    assert deep is not None and deep.status == 400 and "nested too deeply" in str(deep.body)
    assert body_problem('{"id": "café"}'.encode()) is None
    assert body_problem(b'{"id": "\\u00e9"}') is None
    assert body_problem(b"[" * 600 + b"]" * 600) is None  # many brackets, shallow enough
    assert len(parsed) == 5


@pytest.fixture
def usage_server(tmp_path: Path) -> Iterator[LocalServer]:
    """A custom-mode usage pipeline (its real SQLite store) behind the real API listener."""
    svc = UsageService(
        UsagePolicy("prod-cpu", ("scans",), tmp_path, entitlement_check="none"),
        lambda: None,  # type: ignore[arg-type,return-value]  # nothing is sent here
    )
    router = Router(None, lambda: None, readiness=lambda: (True, None), usage=svc)
    others = set(threading.enumerate())
    server = LocalServer(("127.0.0.1", 0), router, API_LIMITS)
    thread = server.serve_in_thread("test-api")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        # Its connection threads (lowered to nice +10, as the API's are) end before the next
        # test runs: tests/test_probe_priority.py counts this process's nice threads.
        end = time.monotonic() + 10
        while any(t.name.endswith("(_serve)") for t in set(threading.enumerate()) - others):
            assert time.monotonic() < end, "a connection thread outlived its server"
            time.sleep(0.01)
        svc.close()


def _post(server: LocalServer, body: bytes, extra: bytes = b"") -> tuple[int, dict[str, Any]]:
    port = server.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /v1/usage HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + extra
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def test_a_usage_post_is_stored_once_and_a_bad_one_named_over_the_real_listener(
    usage_server: LocalServer,
) -> None:
    """Through the real listener, with a folded and a non-ASCII header: stored (202), a repeat
    answered as a repeat (200), an inexact quantity named (400)."""
    one = b'{"dimension": "scans", "quantity": 2, "id": "cpu-1"}'
    assert _post(usage_server, one)[0] == 202
    two = b'{"dimension": "scans", "quantity": "2.5", "id": "cpu-2"}'
    assert _post(usage_server, two, b"X-Note: caf\xe9\r\nX-Folded: a\r\n b\r\n")[0] == 202
    status, doc = _post(usage_server, one)
    assert status == 200, doc
    bad = b'{"dimension": "scans", "quantity": 2.0000001, "id": "cpu-3"}'
    status, doc = _post(usage_server, bad)
    assert status == 400 and doc["error"]["field"] == "quantity", doc


def test_usage_bodies_decode_as_json_loads_decodes_them_in_any_encoding() -> None:
    """The validator's UTF-8 shortcut (a body opening with `{` or `[`) changes no answer:
    UTF-16 and UTF-32 bodies, with or without a BOM, and UTF-8 with a BOM, read the same."""
    limits = Limits(("scäns",))  # a configured name, not ASCII: the encoding matters
    text = '[{"dimension": "scäns", "quantity": "2.5", "id": "r-1"}]'
    want = parse(text.encode(), limits, 0.0)
    assert want[0].micros == 2_500_000 and want[0].dimension == "scäns"
    for encoding in ("utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"):
        body = text.encode(encoding)
        assert json.loads(body) == json.loads(text)  # what the shortcut must agree with
        assert parse(body, limits, 0.0) == want, encoding
    with pytest.raises(RejectedError) as refused:
        parse(b"{\x00", limits, 0.0)  # opens with `{`, then a NUL: UTF-16, and not JSON
    assert refused.value.problems[0].field == "body"


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_a_lone_surrogate_escaped_in_utf16_or_utf32_is_still_refused(encoding: str) -> None:
    """ASCII text in UTF-16 or UTF-32 without a BOM is ASCII bytes with NULs between: its
    `\\ud800` escape is no `\\u` byte pair, so the shortcut let it by, and SaaS mode took
    `customer_identifier: "x\\ud800"` (no UTF-8 encoder, botocore's included, accepts it)."""
    body = '{"dimension":"d1","quantity":1,"customer_identifier":"x\\ud800"}'.encode(encoding)
    reply = body_problem(body)
    assert reply is not None and "surrogate" in str(reply)
