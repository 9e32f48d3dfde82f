"""The local API as a client sees it: status codes, JSON errors, limits, idle connections."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
import requests

from sidecar.emulator.service import Emulator
from tests.helpers import Launch, Sidecar


@pytest.fixture
def car(launch: Launch) -> Sidecar:
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


def test_idle_connections_do_not_block_probes(car: Sidecar) -> None:
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


def test_connection_flood_beyond_the_cap_is_refused_not_queued(car: Sidecar) -> None:
    host, port = car.probe.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port))) for _ in range(40)]
    try:
        time.sleep(0.3)
        answers = []
        for s in held[-5:]:
            s.settimeout(2)
            answers.append(s.recv(200))
        assert all(a.startswith(b"HTTP/1.1 503") for a in answers)
    finally:
        for s in held:
            s.close()
    assert requests.get(car.probe + "/readyz", timeout=5).status_code == 200
