"""The API listener's CPU turn (`CpuTurn`), attacked: nothing that waits may hold it.

One API request computes at a time so that a flood leaves the probe thread the CPU (the latency
figure is benchmarks/throughput.py's). A turn held while waiting on a client, AWS or a store
would stall every other API request. Here each server's turn waits `HELD` seconds before a
request goes on without it: a turn wrongly held shows up as a request answered late and as a
`late` count, both asserted. The bounds are generous (2 s for answers that take milliseconds).
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest
import requests

from sidecar.app import Daemon
from sidecar.config import load
from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.server.api import (
    API_LIMITS,
    PROBE_LIMITS,
    CpuTurn,
    LocalServer,
    Router,
    head_complete,
)
from tests.helpers import free_port, loopback_env

HELD = 5.0  # a wrongly held turn delays the next request by this much: far past ANSWER
ANSWER = 2.0  # what "answered at once" means here, on a loaded 2-core machine


@pytest.fixture
def daemon(
    monkeypatch: pytest.MonkeyPatch, emulator_server: EmulatorServer, emulator: Emulator
) -> Iterator[Daemon]:
    """The whole hourly-mode sidecar in-process (its real registrar calling the emulator), so
    the test can read its API listener's turn."""
    env = loopback_env(
        emulator_server.url,
        MARKETPLACE_PRODUCT_CODE="prod-abc",
        MARKETPLACE_PUBLIC_KEY=emulator.public_pem(),
        MARKETPLACE_LISTEN=f"127.0.0.1:{free_port()}",
        MARKETPLACE_PROBE_LISTEN=f"127.0.0.1:{free_port()}",
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings, keys = load()
    d = Daemon(settings, keys)
    d.api.turn = CpuTurn(wait=HELD)
    d.start()
    try:
        deadline = time.monotonic() + 15
        while not d.machine.snapshot().entitled:
            assert time.monotonic() < deadline, "the sidecar never became entitled"
            time.sleep(0.02)
        yield d
    finally:
        d.close()


def url(server: LocalServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def answered_at_once(server: LocalServer, path: str = "/v1/entitlement", times: int = 3) -> None:
    """`times` requests on fresh connections, each answered within ANSWER seconds."""
    for _ in range(times):
        started = time.monotonic()
        r = requests.get(url(server) + path, timeout=HELD + 5)
        assert r.status_code in (200, 404, 503)
        assert time.monotonic() - started < ANSWER, f"{path} waited for the turn"


def connect(server: LocalServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5)


class Drip:
    """Send `data` on `sock` one byte every `gap` seconds, in a thread."""

    def __init__(self, sock: socket.socket, data: bytes, gap: float = 0.1) -> None:
        self.sock, self.data, self.gap = sock, data, gap
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for byte in self.data:
            if self.stop.wait(self.gap):
                return
            self.sock.sendall(bytes([byte]))
            self.sent += 1

    def dripping(self) -> bool:
        return self.thread.is_alive() and 0 < self.sent < len(self.data)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def wait_until(cond: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "the attack never got going"
        time.sleep(0.01)


# -- the unit pieces -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("buffered", "complete"),
    [
        (b"GET /v1/entitlement HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"GET / HTTP/1.1\n\n", True),  # bare LF, as the stdlib accepts
        (b"GET /v1/entitlement HTTP/1.1\r\nHost: x\r\n", False),  # headers still coming
        (b"GET /v1/entitlement HTTP/1.1\r\nHost: x\r\n\r", False),
        (b"G", False),
        (b"POST /v1/usage HTTP/1.1\r\nContent-Length: 9\r\n\r\n{", True),  # the body is later
    ],
)
def test_a_head_counts_as_complete_only_with_its_blank_line(
    buffered: bytes, complete: bool
) -> None:
    assert head_complete(buffered) is complete


def test_only_memory_only_routes_are_on_the_turn_allowlist(daemon: Daemon) -> None:
    router = daemon.api.router
    for method, path in [
        ("GET", "/healthz"),
        ("HEAD", "/readyz"),
        ("GET", "/v1/entitlement"),
        ("GET", "/nothing/here"),  # 404
        ("DELETE", "/v1/usage"),  # 405
    ]:
        assert router.cpu_only(method, path), (method, path)
    for method, path in [
        ("POST", "/v1/entitlement/challenge"),  # AWS
        ("POST", "/v1/usage"),
        ("GET", "/v1/usage"),
        ("POST", "/v1/customers/resolve"),
        ("GET", "/v1/customers"),
        ("GET", "/v1/customers/123456789012"),
    ]:
        assert not router.cpu_only(method, path), (method, path)
    # SaaS mode's /readyz asks the store (PostgreSQL): not on the list.
    saas = Router(None, lambda: None, readiness=lambda: (True, None))
    assert not saas.cpu_only("GET", "/readyz")


# -- stand-ins at the edges: what does a handler see? ----------------------------------------


class Seen:
    """SaaS endpoint, readiness and health stand-ins that record whether the API's turn was
    held while they ran (the router and server are the real ones)."""

    def __init__(self) -> None:
        self.turn = CpuTurn(wait=HELD)
        self.seen: dict[str, bool] = {}
        self.problem: str | None = None

    def _saw(self, name: str) -> None:
        self.seen[name] = self.turn.locked()

    def post(self, body: bytes) -> tuple[int, dict[str, Any]]:
        self._saw("usage post")
        return 200, {"accepted": 0}

    def report(self) -> dict[str, Any]:
        self._saw("usage report")
        return {}

    def resolve(self, body: bytes) -> tuple[int, dict[str, Any]]:
        self._saw("resolve")
        return 200, {}

    def customers(self) -> tuple[int, dict[str, Any]]:
        self._saw("customers")
        return 200, {"customers": []}

    def customer(self, key: str) -> tuple[int, dict[str, Any]]:
        self._saw("customer")
        return 200, {}

    def changes(self, since: int, wait: float) -> tuple[int, dict[str, Any]]:
        self._saw("changes")
        return 200, {"cursor": str(since), "changes": []}

    def dead_letters(self, limit: int, offset: int) -> tuple[int, dict[str, Any]]:
        self._saw("dead letters")
        return 200, {"total": 0, "dead_letters": []}

    def dead_letter(self, message_id: str) -> tuple[int, dict[str, Any]]:
        self._saw("dead letter")
        return 404, {"error": "unknown_dead_letter", "message": "none"}

    def ready(self) -> tuple[bool, str | None]:
        self._saw("readyz")
        return True, None

    def health(self) -> str | None:
        self._saw("healthz")
        return self.problem


@pytest.fixture
def stand_in() -> Iterator[tuple[Seen, LocalServer, LocalServer]]:
    seen = Seen()
    servers = []
    for name, limits in (("api", API_LIMITS), ("probe", PROBE_LIMITS)):
        listener: Literal["api", "probe"] = "api" if name == "api" else "probe"
        router = Router(None, seen.health, listener=listener, saas=seen, readiness=seen.ready)
        server = LocalServer(
            ("127.0.0.1", 0), router, limits, name=name, turn=seen.turn if name == "api" else None
        )
        server.serve_in_thread(name)
        servers.append(server)
    try:
        yield seen, servers[0], servers[1]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_handlers_that_can_block_run_without_the_turn(
    stand_in: tuple[Seen, LocalServer, LocalServer],
) -> None:
    seen, api, probe = stand_in
    base = url(api)
    with requests.Session() as s:  # keep-alive: the turn is given back between requests too
        assert s.post(base + "/v1/usage", data=b"{}", timeout=5).status_code == 200
        assert s.get(base + "/v1/usage", timeout=5).status_code == 200
        assert s.post(base + "/v1/customers/resolve", data=b"{}", timeout=5).status_code == 200
        assert s.get(base + "/v1/customers", timeout=5).status_code == 200
        assert s.get(base + "/v1/customers/123456789012", timeout=5).status_code == 200
        assert s.get(base + "/v1/saas/dead-letters", timeout=5).status_code == 200
        assert s.get(base + "/v1/saas/dead-letters/m-1", timeout=5).status_code == 404
        assert s.get(base + "/readyz", timeout=5).status_code == 200  # asks the store
        assert s.get(base + "/healthz", timeout=5).status_code == 200
    held = {name for name, locked in seen.seen.items() if locked}
    assert held == {"healthz"}, "only the memory-only route runs under the turn"
    assert len(seen.seen) == 9
    # The probe listener has no turn at all. `seen` reads the shared turn: wait until the API
    # thread of the last request, whose answer may arrive a moment before it lets go, gave it back.
    wait_until(lambda: not seen.turn.locked())
    seen.seen.clear()
    assert requests.get(url(probe) + "/healthz", timeout=5).status_code == 200
    assert seen.seen == {"healthz": False}
    assert not seen.turn.locked() and seen.turn.late == 0


def test_a_client_that_never_reads_a_large_reply_does_not_hold_the_turn(
    stand_in: tuple[Seen, LocalServer, LocalServer],
) -> None:
    """/healthz is on the allowlist; a 4 MiB reason makes its 503 larger than any socket
    buffer, and this client never reads it."""
    seen, api, _ = stand_in
    seen.problem = "x" * (4 << 20)
    sock = connect(api)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: _unread(sock) > 0)
        time.sleep(0.2)  # the server is now blocked in its send, the socket buffers full
        assert 0 < _unread(sock) < len(seen.problem)
        seen.problem = None
        answered_at_once(api, "/healthz")
        assert seen.turn.late == 0
    finally:
        sock.close()


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in this socket's receive queue."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0])


def test_the_turn_is_taken_with_a_bounded_wait(
    stand_in: tuple[Seen, LocalServer, LocalServer],
) -> None:
    """Defence in depth: a turn stuck elsewhere (a bug) delays a request by `wait`, no more."""
    seen, api, _ = stand_in
    api.turn = turn = CpuTurn(wait=0.2)
    seen.turn = turn
    assert turn.take()  # the test thread stands for the bug that never lets go
    try:
        r = requests.get(url(api) + "/healthz", timeout=5)
        assert r.status_code == 200
        assert turn.late == 1
        assert seen.seen["healthz"] is True  # the lock is the test's, still held
    finally:
        turn.give()


# -- the real sidecar under attack -----------------------------------------------------------


def test_a_dripping_request_head_does_not_delay_other_requests(daemon: Daemon) -> None:
    drip = Drip(connect(daemon.api), b"GET /v1/entitlement HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        wait_until(lambda: drip.sent >= 3)
        assert not daemon.api.turn.locked()  # type: ignore[union-attr]
        answered_at_once(daemon.api)
        assert drip.dripping()
    finally:
        drip.close()
    assert daemon.api.turn is not None and daemon.api.turn.late == 0


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v1/entitlement/challenge HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n",
        # A memory-only route that got a body: given back for the body, taken again after.
        b"GET /v1/entitlement HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n",
    ],
)
def test_a_slowly_arriving_body_does_not_delay_other_requests(daemon: Daemon, head: bytes) -> None:
    sock = connect(daemon.api)
    sock.sendall(head)  # the head complete in one segment: parsed under the turn
    drip = Drip(sock, b'{"nonce": "' + b"n" * 27 + b'"}')
    try:
        wait_until(lambda: drip.sent >= 3)
        answered_at_once(daemon.api)
        assert drip.dripping()
    finally:
        drip.close()
    assert daemon.api.turn is not None and daemon.api.turn.late == 0


def test_a_slow_aws_call_does_not_delay_the_entitlement(daemon: Daemon, emulator: Emulator) -> None:
    emulator.reconfigure({"latency": 3.0})
    calls = len(emulator.calls)
    out: list[int] = []
    challenge = threading.Thread(
        target=lambda: out.append(
            requests.post(
                url(daemon.api) + "/v1/entitlement/challenge", json={"nonce": "n-1"}, timeout=15
            ).status_code
        ),
        daemon=True,
    )
    challenge.start()
    time.sleep(0.3)  # the challenge is now waiting on RegisterUsage
    answered_at_once(daemon.api)
    answered_at_once(daemon.api, "/readyz")
    assert challenge.is_alive(), "the challenge did not wait on AWS: nothing was tested"
    challenge.join(timeout=15)
    emulator.reconfigure({"latency": 0.0})
    assert out == [200] and len(emulator.calls) == calls + 1
    assert daemon.api.turn is not None and daemon.api.turn.late == 0


def test_pipelined_requests_whose_replies_are_never_read_do_not_stall_the_api(
    daemon: Daemon,
) -> None:
    """Thousands of GET /v1/entitlement sent at once by a client that reads nothing: each reply
    is small, but together they fill every buffer and the server's send blocks."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", daemon.api.server_address[1]))
    request = b"GET /v1/entitlement HTTP/1.1\r\nHost: x\r\n\r\n"
    sender = threading.Thread(target=_send_quietly, args=(sock, request * 20000), daemon=True)
    try:
        sender.start()
        wait_until(lambda: _unread(sock) > 0)
        seen = [-1]

        def stopped_growing() -> bool:  # the server's send now blocks on the full buffers
            before, seen[0] = seen[0], _unread(sock)
            time.sleep(0.3)
            return before == seen[0]

        wait_until(stopped_growing)
        answered_at_once(daemon.api)
        assert daemon.api.turn is not None and daemon.api.turn.late == 0
    finally:
        sock.close()
        sender.join(timeout=5)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the test closed the socket under it
        sock.sendall(data)
