"""The local API as a client sees it: status codes, JSON errors, limits, idle connections."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import Launch, Sidecar, loopback_env, start_sidecar


@pytest.fixture(scope="module")
def shared_car(emulator_server: EmulatorServer) -> Iterator[Sidecar]:
    """One sidecar for the module's tests that only send requests and read answers: none of
    them changes what the next one sees (a start costs ~0.6 s of CPU; 19 tests share one).
    Tests that count connection slots start their own (`fresh_car`)."""
    emulator_server.emulator.reset()
    env = loopback_env(
        emulator_server.url, MARKETPLACE_PUBLIC_KEY=emulator_server.emulator.public_pem()
    )
    car = start_sidecar(env)
    # Its stderr is a pipe nobody reads while the module runs: drained, so it never fills.
    threading.Thread(target=_drain, args=(car,), daemon=True).start()
    yield car
    car.stop()


def _drain(car: Sidecar) -> None:
    assert car.proc.stderr is not None
    for line in car.proc.stderr:
        car.stderr_lines.append(line)


@pytest.fixture
def car(shared_car: Sidecar, emulator: Emulator) -> Sidecar:
    """The shared sidecar, checked as each test starts: still running, entitled, both
    listeners answering (the emulator is reset by `emulator`; the sidecar's state is not)."""
    assert shared_car.proc.poll() is None, "".join(shared_car.stderr_lines)[-2000:]
    shared_car.wait_for(lambda d: d["state"] == "entitled")
    assert shared_car.get("/healthz", probe=True).status_code == 200
    return shared_car


@pytest.fixture
def fresh_car(launch: Launch) -> Sidecar:
    car = launch()
    car.wait_for(lambda d: d["state"] == "entitled")
    return car


def raw(url: str, payload: bytes, read: int = 4096) -> tuple[int, dict[str, Any], str]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(payload)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(read)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        while len(body) < length:
            body += s.recv(read)
    status = int(head.split(b" ")[1])
    return status, json.loads(body), head.decode()


def test_unknown_path_404_and_wrong_method_405_are_json(car: Sidecar) -> None:
    r = requests.get(car.api + "/v2/nothing", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = requests.delete(car.api + "/v1/entitlement", timeout=5)
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"
    r = requests.get(car.api + "/v1/entitlement/challenge", timeout=5)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    r = requests.get(car.probe + "/v1/entitlement", timeout=5)
    assert r.status_code == 404  # the probe listener never exposes the token


def test_head_and_query_strings(car: Sidecar) -> None:
    r = requests.head(car.api + "/readyz", timeout=5)
    assert r.status_code == 200 and r.content == b""
    assert requests.get(car.api + "/v1/entitlement?x=1", timeout=5).status_code == 200


def test_oversized_and_chunked_bodies(car: Sidecar) -> None:
    r = requests.post(car.api + "/v1/entitlement/challenge", data=b"x" * 5000, timeout=5)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    status, body, _ = raw(
        car.api,
        b"POST /v1/entitlement/challenge HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    assert status == 411 and body["error"]["code"] == "length_required"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/9.9\r\n\r\n", 505),  # RFC 9110: unsupported major version
        (b"GET /healthz HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 150 + b"\r\n", 431),
    ],
)
def test_malformed_http_gets_a_json_protocol_error(
    car: Sidecar, payload: bytes, expected: int
) -> None:
    status, body, _ = raw(car.api, payload)
    assert status == expected
    assert set(body["error"]) == {"code", "message"}


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "invalid_nonce"),
        (b"not json", "invalid_json"),
        (b"[]", "invalid_nonce"),
        (b'{"nonce": ""}', "invalid_nonce"),
        (b'{"nonce": 5}', "invalid_nonce"),
        (json.dumps({"nonce": "x" * 256}).encode(), "invalid_nonce"),
        (b"\xff\xfe", "invalid_json"),
    ],
)
def test_bad_challenge_bodies_are_400_naming_the_field(
    car: Sidecar, emulator: Emulator, data: bytes, code: str
) -> None:
    calls = len(emulator.calls)
    r = requests.post(car.api + "/v1/entitlement/challenge", data=data, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["code"] == code
    if code == "invalid_nonce":
        assert "nonce" in r.json()["error"]["message"]
    assert len(emulator.calls) == calls  # nothing reached AWS


def test_keep_alive_connection_is_reused(car: Sidecar) -> None:
    with requests.Session() as s:
        for _ in range(20):
            assert s.get(car.api + "/v1/entitlement", timeout=5).status_code == 200
        conns = s.get_adapter(car.api).poolmanager.pools  # type: ignore[attr-defined]
        assert len(conns) == 1


def test_idle_connections_do_not_block_probes(fresh_car: Sidecar) -> None:
    car = fresh_car
    idle = []
    for url in (car.api, car.probe):
        host, port = url.removeprefix("http://").split(":")
        for _ in range(20):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"GET /readyz HTTP/1.1\r\n")  # never finishes its headers
            idle.append(s)
    try:
        started = time.monotonic()
        assert requests.get(car.probe + "/readyz", timeout=2).status_code == 200
        assert requests.get(car.api + "/healthz", timeout=2).status_code == 200
        assert time.monotonic() - started < 2
    finally:
        for s in idle:
            s.close()


def _hostport(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _closed_by_server(s: socket.socket, within: float) -> tuple[bool, bytes]:
    """Read until the server closes (True) or `within` seconds pass (False)."""
    s.settimeout(0.1)
    seen = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, seen
        if not chunk:
            return True, seen
        seen += chunk
    return False, seen


def test_a_full_listener_evicts_its_oldest_idle_connection_for_a_new_one(
    fresh_car: Sidecar,
) -> None:
    car = fresh_car
    held = [socket.create_connection(_hostport(car.probe)) for _ in range(40)]  # cap 32
    try:
        time.sleep(0.3)
        for s in held[:8]:  # the 8 oldest made room for the 8 newest
            assert _closed_by_server(s, 2)[0]
        for s in held[-5:]:
            assert not _closed_by_server(s, 0.2)[0]
        # and one more: a kubelet probe gets in at once, by evicting the next oldest
        assert requests.get(car.probe + "/readyz", timeout=1).status_code == 200
        assert _closed_by_server(held[8], 2)[0]
    finally:
        for s in held:
            s.close()


def test_a_dripping_request_is_cut_off_at_its_deadline_with_408(car: Sidecar) -> None:
    """Probe listener: the whole request within 3 s of its first byte, however it drips."""
    with socket.create_connection(_hostport(car.probe)) as s:
        started = time.monotonic()
        s.settimeout(0.1)
        answer = b""
        for byte in b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
            try:
                s.send(bytes([byte]))
            except OSError:
                break
            closed, seen = _closed_by_server(s, 0.4)  # one byte per 0.4 s: never idle 5 s
            answer += seen
            if closed:
                break
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"request_timeout"' in answer
    assert 2.5 < elapsed < 5.0


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(car: Sidecar) -> None:
    with socket.create_connection(_hostport(car.probe)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        closed, seen = _closed_by_server(s, 8)
        assert seen.startswith(b"HTTP/1.1 200 ")
        assert closed and 4.0 < time.monotonic() - started < 7.0  # probe idle timeout: 5 s


def test_content_length_must_be_one_ascii_number(car: Sidecar) -> None:
    for header, expected in (
        (b"Content-Length: \xb2", 400),  # superscript two: isdigit() says yes, int() says no
        (b"Content-Length: \xd9\xa3", 400),  # an Arabic-Indic digit, read as latin-1
        (b"Content-Length: 5\r\nContent-Length: 6", 400),  # two lengths: which body?
        (b"Content-Length: 1" + b"0" * 5000, 413),  # past int()'s 4300-digit limit
    ):
        status, body, head = raw(
            car.api,
            b"POST /v1/entitlement/challenge HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n",
        )
        assert status == expected, header[:40]
        assert set(body["error"]) == {"code", "message"}
        assert "Connection: close" in head
    assert car.get("/healthz").status_code == 200


def test_json_that_cannot_reach_aws_is_400_without_a_call(car: Sidecar, emulator: Emulator) -> None:
    calls = len(emulator.calls)
    for data in (
        b'{"nonce": "\\ud800"}',
        b'{"nonce": "ok\\udfffok"}',
        b'{"nonce": "n", "x\\ud800": 1}',
        b"[" * 4000,
        b'{"nonce": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    ):
        r = requests.post(car.api + "/v1/entitlement/challenge", data=data, timeout=5)
        assert r.status_code == 400, data[:40]
        assert r.json()["error"]["code"] == "invalid_json"
    assert len(emulator.calls) == calls  # nothing reached AWS
    assert car.get("/healthz").status_code == 200


def test_a_valid_surrogate_pair_is_an_ordinary_nonce(car: Sidecar) -> None:
    r = requests.post(
        car.api + "/v1/entitlement/challenge", data=b'{"nonce": "\\ud83d\\ude00"}', timeout=10
    )
    assert r.status_code == 200
    assert r.json()["claims"]["nonce"] == "\U0001f600"


def test_readyz_on_the_probe_listener_names_only_the_state_and_code(
    launch: Launch, emulator: Emulator
) -> None:
    emulator.reconfigure({"entitled": False})
    car = launch()
    car.wait_for(lambda d: d["state"] == "not_entitled")
    probe = car.get("/readyz", probe=True)
    assert probe.status_code == 503
    assert probe.json() == {
        "ready": False,
        "state": "not_entitled",
        "error": {"code": "CustomerNotEntitledException"},
    }
    local = car.get("/readyz")  # the loopback API keeps the whole error
    assert local.status_code == 503
    assert {"code", "message", "hint", "kind"} <= set(local.json()["error"])
