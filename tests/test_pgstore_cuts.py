"""The PostgreSQL store's connection cut at the worst statements, deterministically.

A loopback TCP relay between the store and a real server cuts the writer's connection when
it sees a chosen statement go by: before the server gets it, or just after. BEGIN, the locks
and the first savepoint travel in one round trip, so a cut there must cost a reconnect (a
connection that died while idle) or a certain "not stored", never a double write; a cut at
COMMIT must say the outcome is unknown (the client resends with the same id).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from sidecar.usage.db import Db, Schema, StoreOutcomeUnknownError, StoreUnavailableError
from sidecar.usage.pgstore import PgStore

DDL = """
CREATE TABLE items (id TEXT PRIMARY KEY, n BIGINT NOT NULL);
"""
SCHEMA = Schema(name="t", version=1, sqlite=DDL, postgresql=DDL)
BEGIN = b"BEGIN ISOLATION LEVEL READ COMMITTED"
LOCKS = [(7, True)]


class CutRelay:
    """Relays connections to PostgreSQL; cuts the next `times` connections whose client sends
    `pattern`, before forwarding that message or just after."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.pattern = b""
        self.after = False
        self.times = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def arm(self, pattern: bytes, *, after: bool, times: int = 1) -> None:
        with self._lock:
            self.pattern, self.after, self.times = pattern, after, times

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [client, server]
            cut = threading.Event()  # this connection was cut: the client hears nothing more
            threading.Thread(target=self._up, args=(client, server, cut), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, cut), daemon=True).start()

    def _cut_now(self, chunk: bytes) -> bool:
        with self._lock:
            if self.times > 0 and self.pattern and self.pattern in chunk:
                self.times -= 1
                self.cuts += 1
                return True
            return False

    def _up(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        ends = (client, server)
        try:
            while chunk := client.recv(65536):
                if self._cut_now(chunk):
                    cut.set()  # first: the server's answer to it must never reach the client
                    if self.after:  # the server gets it; its answer goes nowhere (`_down`)
                        server.sendall(chunk)
                        ends = (client, client)
                    break
                server.sendall(chunk)
        except OSError:
            pass
        _close(*ends)

    def _down(self, server: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        try:
            while (chunk := server.recv(65536)) and not cut.is_set():
                client.sendall(chunk)
        except OSError:
            pass
        _close(server, client)


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()


@pytest.fixture
def relayed(pg_url: str) -> Iterator[tuple[CutRelay, str]]:
    """The relay, and the test database's URL through it."""
    parts = urlsplit(pg_url)
    assert parts.hostname and parts.port
    relay = CutRelay((parts.hostname, parts.port))
    netloc = f"{parts.username}@127.0.0.1:{relay.port}"
    try:
        yield relay, urlunsplit(parts._replace(netloc=netloc))
    finally:
        relay.close()


def insert(key: str) -> Any:
    def job(db: Db) -> None:
        db.lock(7)
        db.execute("INSERT INTO items VALUES (?, ?)", (key, 1))

    return job


def stored(pg_url: str) -> list[str]:
    with psycopg.connect(pg_url) as conn:
        return sorted(r[0] for r in conn.execute("SELECT id FROM items"))


@pytest.fixture
def store(relayed: tuple[CutRelay, str]) -> Iterator[PgStore]:
    s = PgStore(SCHEMA, relayed[1], writers=1)
    try:
        s.write(insert("warm"), locks=LOCKS)  # the writer's connection now exists: reused next
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("after", [False, True], ids=["before-the-server-sees-it", "just-after"])
def test_a_kept_connection_cut_at_begin_costs_a_reconnect_not_a_503(
    relayed: tuple[CutRelay, str], store: PgStore, pg_url: str, after: bool
) -> None:
    relay, _ = relayed
    relay.arm(BEGIN, after=after)
    store.write(insert("one"), locks=LOCKS)  # answered as stored
    assert relay.cuts == 1
    # stored once; the cut transaction's advisory lock went with its session
    assert stored(pg_url) == ["one", "warm"]
    store.write(insert("two"), locks=LOCKS)
    assert stored(pg_url) == ["one", "two", "warm"]


@pytest.mark.parametrize("after", [False, True], ids=["before-the-server-sees-it", "just-after"])
def test_begin_cut_twice_in_a_row_is_not_stored_and_says_so(
    relayed: tuple[CutRelay, str], store: PgStore, pg_url: str, after: bool
) -> None:
    """The reconnect's own BEGIN is cut too: a certain "not stored" (503, the client resends),
    not "outcome unknown", and nothing of it is in the database; the store goes on."""
    relay, _ = relayed
    relay.arm(BEGIN, after=after, times=2)
    with pytest.raises(StoreUnavailableError) as caught:
        store.write(insert("one"), locks=LOCKS)
    assert not isinstance(caught.value, StoreOutcomeUnknownError)
    assert relay.cuts == 2
    assert stored(pg_url) == ["warm"]
    store.write(insert("one"), locks=LOCKS)  # the client's resend with the same id
    assert stored(pg_url) == ["one", "warm"]


@pytest.mark.parametrize("after", [False, True], ids=["before-the-server-sees-it", "just-after"])
def test_a_cut_at_commit_says_the_outcome_is_unknown_and_a_resend_finds_it(
    relayed: tuple[CutRelay, str], store: PgStore, pg_url: str, after: bool
) -> None:
    """Cut before the server reads COMMIT: rolled back; just after: committed. The store
    cannot tell which, so it says so either way (the client resends with the same id; the
    ledger's id check makes the resend count once)."""
    relay, _ = relayed
    relay.arm(b"COMMIT\x00", after=after)  # not READ COMMITTED
    with pytest.raises(StoreOutcomeUnknownError):
        store.write(insert("one"), locks=LOCKS)
    assert relay.cuts == 1
    # the server finishes with the cut session in its own time: the row appears or never does
    expected = ["one", "warm"] if after else ["warm"]
    deadline = time.monotonic() + 5
    while stored(pg_url) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stored(pg_url) == expected

    def resend(db: Db) -> bool:  # what the ledger does with a repeated id, in miniature
        db.lock(7)
        if db.execute("SELECT 1 FROM items WHERE id = ?", ("one",)).fetchone():
            return False
        db.execute("INSERT INTO items VALUES (?, ?)", ("one", 1))
        return True

    assert store.write(resend, locks=LOCKS) is (not after)
    assert stored(pg_url) == ["one", "warm"]
