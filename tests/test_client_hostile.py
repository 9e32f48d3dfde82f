"""Issue: the product-side client must keep its contract against a hostile sidecar.

A fake sidecar on loopback misbehaves in each way an attacker (or a broken proxy) could: it
drips bytes, never answers, sends a broken status line, a 70 KB header, 60,000 nested `[`,
an `error` that is a string, a redirect elsewhere, an endless body, odd `Retry-After` values.
Both clients (Python `sidecar.client` and the Node example) must raise/reject with
`EntitlementError` and a reason, within the caller's timeout plus a small margin.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from sidecar import client
from tests.helpers import ROOT, free_port, new_key, pem

NODE = shutil.which("node")
NODE_CLIENT = ROOT / "examples" / "node" / "verify.js"
TIMEOUT = 2.0  # the caller's timeout in the deadline cases
MARGIN = 0.75  # how far past it a call may end (scheduling noise)
FAST = 1.0  # cases the client can decide without waiting for the deadline

Behaviour = Callable[[socket.socket, threading.Event], None]


class HostileSidecar:
    """Accepts connections on 127.0.0.1, reads each request, then runs `behave` on it."""

    def __init__(self, behave: Behaviour) -> None:
        self.behave = behave
        self.requests: list[bytes] = []
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                self.requests.append(_read_request(conn))
                self.behave(conn, self.stop)
            except OSError:
                pass  # the client hung up: exactly what it should do

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def send(raw: bytes) -> Behaviour:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(raw)

    return behave


def answer(status: str, body: bytes, *headers: str) -> Behaviour:
    head = "".join(f"{h}\r\n" for h in (*headers, f"Content-Length: {len(body)}"))
    return send(f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body)


def drip(prefix: bytes, forever: bytes) -> Behaviour:
    """Send `prefix`, then one byte of `forever` every 0.1 s: no read ever times out."""

    def behave(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(prefix)
        for i in range(len(forever)):
            if stop.wait(0.1):
                return
            conn.sendall(forever[i : i + 1])

    return behave


def silent(conn: socket.socket, stop: threading.Event) -> None:
    stop.wait(30)


def endless_body(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[")
    while not stop.is_set():
        conn.sendall(b"[" * 65536)


def declared_huge(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
    while not stop.is_set():
        conn.sendall(b" " * 65536)


def retry_at(seconds_from_now: float) -> Behaviour:
    """A 429 whose Retry-After is an HTTP date, computed when the answer is sent."""

    def behave(conn: socket.socket, stop: threading.Event) -> None:
        when = datetime.now(UTC) + timedelta(seconds=seconds_from_now)
        date = format_datetime(when, usegmt=True)
        answer("429 Too Many Requests", b"{}", f"Retry-After: {date}")(conn, stop)

    return behave


@dataclass
class Case:
    behave: Behaviour
    reason: str
    within: float = FAST  # seconds the call may take
    retry_after: tuple[float, float] | None = None  # inclusive range
    message: str = ""  # a substring of the message


SLOW = TIMEOUT + MARGIN
CASES: dict[str, Case] = {
    "drip_headers": Case(drip(b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 500), "timeout", SLOW),
    "drip_body": Case(
        drip(b"HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n", b'{"token": "' + b"a" * 880),
        "timeout",
        SLOW,
    ),
    "never_answers": Case(silent, "timeout", SLOW),
    "closes_at_once": Case(send(b""), "bad_answer"),
    "bad_status_line": Case(send(b"HTTP/1.1 OK fine\r\nContent-Length: 2\r\n\r\n{}"), "bad_answer"),
    "not_http": Case(send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), "bad_answer"),
    "70kb_header": Case(
        send(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\nContent-Length: 2\r\n\r\n{}"),
        "bad_answer",
    ),
    "nested_60000_on_200": Case(answer("200 OK", b"[" * 60_000), "bad_answer"),
    "nested_60000_in_error": Case(
        answer("403 Forbidden", b'{"error": ' + b"[" * 60_000), "sidecar_403"
    ),
    "error_is_a_string": Case(
        answer("403 Forbidden", b'{"error": "go away"}'), "sidecar_403", message="go away"
    ),
    "error_fields_wrong_types": Case(
        answer("403 Forbidden", b'{"error": {"code": ["x"], "message": 5}}'),
        "sidecar_403",
        message="http_403",
    ),
    "not_json": Case(answer("200 OK", b"<html>entitled</html>"), "bad_answer"),
    "not_utf8": Case(answer("200 OK", b'{"token": "\xff\xfe"}'), "bad_answer"),
    "json_list": Case(answer("200 OK", b"[1, 2]"), "bad_answer"),
    "token_not_a_string": Case(answer("200 OK", b'{"token": 42}'), "no_token"),
    "token_garbage": Case(answer("200 OK", b'{"token": "a.b.c"}'), "token_malformed"),
    "declared_100mb": Case(declared_huge, "bad_answer"),
    "endless_body": Case(endless_body, "bad_answer"),
    "content_length_superscript": Case(
        send("HTTP/1.1 200 OK\r\nContent-Length: ²\r\n\r\n{}".encode()), "bad_answer"
    ),
    "cut_short": Case(send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}"), "bad_answer"),
    "chunked": Case(
        send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
        "bad_answer",
    ),
    "retry_after_http_date": Case(
        retry_at(30),
        "rate_limited",
        retry_after=(27.0, 31.0),
    ),
    "retry_after_past_date": Case(
        retry_at(-3600),
        "rate_limited",
        retry_after=(1.0, 1.0),
    ),
    "retry_after_inf": Case(
        answer("429 Too Many Requests", b"{}", "Retry-After: inf"),
        "rate_limited",
        retry_after=(1.0, 1.0),
    ),
    "retry_after_huge": Case(
        answer("503 Service Unavailable", b"{}", "Retry-After: 99999999999"),
        "sidecar_503",
        retry_after=(600.0, 600.0),
    ),
    "retry_after_negative": Case(
        answer("429 Too Many Requests", b"{}", "Retry-After: -5"),
        "rate_limited",
        retry_after=(1.0, 1.0),
    ),
    "retry_after_missing": Case(
        answer("429 Too Many Requests", b"{}"), "rate_limited", retry_after=(1.0, 1.0)
    ),
}


@dataclass
class Outcome:
    reason: str
    message: str
    retry_after: float | None
    elapsed: float
    extra: dict[str, object] = field(default_factory=dict)


@pytest.fixture
def hostile() -> Iterator[Callable[[Behaviour], HostileSidecar]]:
    servers: list[HostileSidecar] = []

    def start(behave: Behaviour) -> HostileSidecar:
        servers.append(HostileSidecar(behave))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "product.pem"
    path.write_text(pem(new_key()))
    return path


def python_client(url: str, key: Path, timeout: float = TIMEOUT) -> Outcome:
    started = time.monotonic()
    with pytest.raises(client.EntitlementError) as info:  # nothing else may escape
        client.challenge(key.read_text(), "prod-abc", url=url, timeout=timeout)
    err = info.value
    return Outcome(err.reason, err.message, err.retry_after, time.monotonic() - started)


# Times the call inside node, so node's own start-up (slow on a loaded machine) is not counted.
NODE_DRIVER = """
const [mod, keyFile, url, timeout] = process.argv.slice(1);
const { challenge, EntitlementError } = require(mod);
const pem = require("fs").readFileSync(keyFile, "utf8");
const started = process.hrtime.bigint();
const seconds = () => Number(process.hrtime.bigint() - started) / 1e9;
challenge(pem, "prod-abc", { url, timeoutSeconds: Number(timeout) }).then(
  () => console.log(JSON.stringify({ reason: "resolved", elapsed: seconds() })),
  (err) => console.log(JSON.stringify(err instanceof EntitlementError
    ? { reason: err.reason, message: err.detail, retry_after: err.retryAfter, elapsed: seconds() }
    : { reason: `escaped: ${err && err.stack}`, elapsed: seconds() })),
);
"""


def node_client(url: str, key: Path, timeout: float = TIMEOUT) -> Outcome:
    assert NODE is not None, "node is required (.ci/run installs it)"
    args = [NODE, "-e", NODE_DRIVER, str(NODE_CLIENT), str(key), url, str(timeout)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    return Outcome(doc["reason"], doc.get("message", ""), doc.get("retry_after"), doc["elapsed"])


def node_cli(url: str, key: Path, timeout: float = TIMEOUT) -> Outcome:
    """The example's own command line: exit 1 and one JSON line for an EntitlementError."""
    assert NODE is not None, "node is required (.ci/run installs it)"
    started = time.monotonic()
    out = subprocess.run(
        [NODE, str(NODE_CLIENT), "challenge", str(key), "prod-abc", url, str(timeout)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1, out.stderr  # 1: EntitlementError; 3: anything else escaped
    doc = json.loads(out.stderr.strip().splitlines()[-1])
    return Outcome(doc["reason"], doc["message"], doc["retry_after"], time.monotonic() - started)


def check(got: Outcome, case: Case, margin: float) -> None:
    assert got.reason == case.reason, got
    assert got.elapsed < case.within + margin, got
    assert case.message in got.message, got
    if case.retry_after is None:
        assert got.retry_after is None, got
    else:
        low, high = case.retry_after
        assert got.retry_after is not None and low <= got.retry_after <= high, got


@pytest.mark.parametrize("name", sorted(CASES))
def test_python_client_fails_closed_within_its_deadline(
    name: str, hostile: Callable[[Behaviour], HostileSidecar], key_file: Path
) -> None:
    case = CASES[name]
    check(python_client(hostile(case.behave).url, key_file), case, 0.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_node_client_fails_closed_within_its_deadline(
    name: str, hostile: Callable[[Behaviour], HostileSidecar], key_file: Path
) -> None:
    case = CASES[name]
    check(node_client(hostile(case.behave).url, key_file), case, 0.0)


def test_a_redirect_is_not_followed(
    hostile: Callable[[Behaviour], HostileSidecar], key_file: Path
) -> None:
    elsewhere = hostile(answer("200 OK", b'{"token": "a.b.c"}'))
    location = f"Location: {elsewhere.url}/v1/entitlement/challenge"
    sidecar = hostile(answer("302 Found", b"", location))
    for run in (python_client, node_client):
        got = run(sidecar.url, key_file)
        assert got.reason == "sidecar_302", got
    assert len(sidecar.requests) == 2 and elsewhere.requests == []


def test_proxy_variables_are_ignored_for_the_sidecar_url(
    hostile: Callable[[Behaviour], HostileSidecar],
    key_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = hostile(answer("200 OK", b'{"token": "proxy.was.used"}'))
    sidecar = hostile(answer("200 OK", b'{"token": "a.b.c"}'))
    variables = {name: proxy.url for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")}
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NODE_USE_ENV_PROXY", "1")  # node >= 24 would honour the variables
    for run in (python_client, node_client):  # node inherits the patched environment
        got = run(sidecar.url, key_file)
        assert got.reason == "token_malformed", got  # the fake sidecar's answer, not the proxy's
    assert proxy.requests == [] and len(sidecar.requests) == 2


def test_a_missing_sidecar_is_reported_by_both_clients(key_file: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for run in (python_client, node_client):
        got = run(url, key_file)
        assert got.reason == "no_sidecar" and got.elapsed < FAST, got
    assert node_cli(url, key_file).reason == "no_sidecar"


def test_the_deadline_covers_the_whole_call_not_each_read(
    hostile: Callable[[Behaviour], HostileSidecar], key_file: Path
) -> None:
    # Headers dripped at 10 bytes/s: every read succeeds quickly, yet the call must end at 1 s.
    sidecar = hostile(drip(b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 500))
    got = python_client(sidecar.url, key_file, timeout=1.0)
    assert got.reason == "timeout" and 0.9 <= got.elapsed < 1.0 + MARGIN, got


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        ("2.5", 2.5),
        ("0", 1.0),
        ("nan", 1.0),
        ("1e999", 1.0),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 1.0),
        ("Fri, 27 Nov 2026 03:00:30 -0000", 30.0),  # -0000 is UTC, not local time
        ("Fri, 27 Nov 2026 03:00:30 GMT", 30.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 600.0),
        ("", 1.0),
        (None, None),
    ],
)
def test_retry_after_is_finite_and_clamped(value: str | None, expected: float | None) -> None:
    now = datetime(2026, 11, 27, 3, 0, 0, tzinfo=UTC).timestamp()
    assert client.parse_retry_after(value, now) == expected


def test_bad_arguments_are_refused_before_any_call(key_file: Path) -> None:
    with pytest.raises(client.EntitlementError) as info:
        client.challenge(key_file.read_text(), "p", url="https://127.0.0.1:1")
    assert info.value.reason == "bad_url"
    with pytest.raises(client.EntitlementError) as info:
        client.challenge(key_file.read_text(), "p", url="http://127.0.0.1:1/x\r\nHost: evil")
    assert info.value.reason == "bad_url"
    with pytest.raises(client.EntitlementError) as info:
        client.challenge("not a key", "p", url="http://127.0.0.1:1")
    assert info.value.reason == "bad_key"
    with pytest.raises(ValueError, match="timeout"):
        client.challenge(key_file.read_text(), "p", timeout=float("inf"))


def test_a_localhost_url_reaches_the_sidecar(
    hostile: Callable[[Behaviour], HostileSidecar], key_file: Path
) -> None:
    sidecar = hostile(answer("200 OK", b'{"token": "a.b.c"}'))
    url = f"http://localhost:{sidecar.port}/"  # a name, and a trailing slash
    for run in (python_client, node_client):
        assert run(url, key_file).reason == "token_malformed"
    assert len(sidecar.requests) == 2
    assert all(
        r.startswith(b"POST /v1/entitlement/challenge HTTP/1.1\r\n") for r in sidecar.requests
    )


def test_a_hostile_sidecars_problem_list_is_capped_and_made_printable(
    hostile: Callable[[Behaviour], HostileSidecar],
) -> None:
    from marketplace_sidecar_client import MAX_PROBLEMS, UsageError, report_usage

    problems: list[dict[str, object]] = [
        {"field": f"f{i}\x1b[31m", "message": "m\n" * 200} for i in range(100)
    ]
    problems[1] = {"field": 7, "message": "not a field name"}  # skipped, not a crash
    body = json.dumps({"error": {"code": "invalid_usage\r\n", "problems": problems}})
    server = hostile(answer("400 Bad Request", body.encode()))
    with pytest.raises(UsageError) as caught:
        report_usage({"dimension": "a", "quantity": 1}, url=server.url, timeout=TIMEOUT)
    error = caught.value
    assert error.reason == "invalid" and len(error.problems) == MAX_PROBLEMS - 1
    assert error.problems[0].field == "f0?[31m"
    assert all(len(p.message) <= 300 and p.message.isprintable() for p in error.problems)
    assert str(error).isprintable() and len(str(error)) < 8_000


_LEASE_REASON = {
    "no_token": "bad_answer",  # an HTTP 200 without this lease's id
    "token_malformed": "bad_answer",
    "rate_limited": "unavailable",
    "sidecar_503": "unavailable",
}


@pytest.mark.parametrize("call", ["checkout", "renew", "checkin"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_lease_calls_fail_closed_within_their_deadline(
    hostile: Callable[[Behaviour], HostileSidecar], name: str, call: str
) -> None:
    from marketplace_sidecar_client import (
        LeaseError,
        checkin_lease,
        checkout_lease,
        renew_lease,
    )

    case = CASES[name]
    server = hostile(case.behave)
    started = time.monotonic()
    with pytest.raises(LeaseError) as caught:  # nothing else may escape
        if call == "checkout":
            checkout_lease("job-1", "Seats", 1, url=server.url, timeout=TIMEOUT)
        elif call == "renew":
            renew_lease("job-1", url=server.url, timeout=TIMEOUT)
        else:
            checkin_lease("job-1", url=server.url, timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    err = caught.value
    assert err.reason == _LEASE_REASON.get(case.reason, case.reason), err
    assert elapsed <= case.within + MARGIN, f"{elapsed:.2f}s"
    if case.retry_after is not None:
        assert err.retry_after is not None
        assert case.retry_after[0] <= err.retry_after <= case.retry_after[1]
    assert str(err).isprintable() and len(str(err)) < 2_000


def test_a_hostile_no_units_answer_keeps_only_sane_details(
    hostile: Callable[[Behaviour], HostileSidecar],
) -> None:
    from marketplace_sidecar_client import LeaseError, checkout_lease

    body = json.dumps(
        {
            "error": {"code": "no_units_left", "message": "x\x1b" * 500},
            "entitlement": "Seats\r\n" * 100,
            "units_asked": True,
            "held_here": -4,
        }
    )
    server = hostile(answer("409 Conflict", body.encode()))
    with pytest.raises(LeaseError) as caught:
        checkout_lease("job-1", "Seats", 1, url=server.url, timeout=TIMEOUT)
    err = caught.value
    assert err.reason == "no_units_left" and err.status == 409
    assert set(err.details) == {"entitlement"} and err.details["entitlement"].isprintable()
    assert len(err.message) < 700 and err.message.isprintable()
