"""The local API under hostile clients: schema-driven fuzzing (schemathesis, from the shipped
OpenAPI document), and many idle or slow connections while kubelet-style probes keep answering.
Bounded in count and time; loopback only."""

from __future__ import annotations

import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

import pytest
import requests

from tests.helpers import Launch

SPEC = Path(str(resources.files("sidecar").joinpath("openapi.yaml")))
# schemathesis' default rejection statuses without "5xx" (a 5xx is never a rejection here),
# plus 413: a string just over its maxLength, JSON-escaped (6-12 bytes a character), can make
# a body over the route's documented size limit, and 413 is then the documented refusal.
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]


@pytest.mark.slow  # a fuzzing campaign
def test_schemathesis_finds_no_5xx_and_no_schema_violation(launch: Launch, tmp_path: Path) -> None:
    car = launch(MARKETPLACE_CHALLENGE_BURST="20", MARKETPLACE_CHALLENGE_RATE_PER_SECOND="5")
    config = tmp_path / "schemathesis.toml"
    statuses = ", ".join(f'"{s}"' for s in REJECTIONS)
    config.write_text(f"[checks.negative_data_rejection]\nexpected-statuses = [{statuses}]\n")
    car.wait_for(lambda d: d["state"] == "entitled")
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is a dev dependency"
    out = subprocess.run(
        [
            st,
            "--config-file",
            str(config),
            "run",
            str(SPEC),
            "--url",
            car.api,
            "--checks",
            "all",
            "--max-examples",
            "60",
            "--seed",
            "20261126",
            "--request-timeout",
            "10",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-4000:]
    # Hourly mode answers /v1/usage with a 404 (usage needs custom mode); schemathesis warns.
    assert "Failures:" not in out.stdout
    assert car.get("/healthz").status_code == 200  # and the sidecar is still fine


class Drippers:
    """`count` connections per address, each sending one byte of a never-ending request every
    `every` seconds, and reconnecting at once whenever the server drops it (an attacker in
    the cluster network). One thread drives them all."""

    REQUEST = b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 4000

    def __init__(self, addresses: list[tuple[str, int]], count: int, every: float) -> None:
        self.every = every
        self.slots = [(addr, i) for addr in addresses for i in range(count)]
        self.socks: dict[tuple[tuple[str, int], int], tuple[socket.socket, int, float]] = {}
        self.reconnects = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, key: tuple[tuple[str, int], int], now: float, stagger: float) -> None:
        try:
            s = socket.create_connection(key[0], timeout=1)
        except OSError:
            self.socks.pop(key, None)
            return
        s.setblocking(False)
        self.socks[key] = (s, 0, now + stagger)

    def _run(self) -> None:
        now = time.monotonic()
        for n, key in enumerate(self.slots):
            self._open(key, now, self.every * n / len(self.slots))
        while not self.stop.wait(0.02):
            now = time.monotonic()
            for key in self.slots:
                entry = self.socks.get(key)
                if entry is None:
                    self.reconnects += 1
                    self._open(key, now, 0.0)
                    continue
                s, sent, due = entry
                if due > now:
                    continue
                # Anything to read means the server answered (408, 503) or closed on us.
                alive = not select.select([s], [], [], 0)[0]
                if alive:
                    try:
                        s.send(self.REQUEST[sent : sent + 1])
                    except OSError:
                        alive = False
                if not alive:  # answered (408/503) or closed: come straight back
                    s.close()
                    self.reconnects += 1
                    self._open(key, now, 0.0)
                else:
                    self.socks[key] = (s, sent + 1, now + self.every)
        for s, _, _ in self.socks.values():
            s.close()

    def __enter__(self) -> Drippers:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def _answers_in_time(url: str) -> bool:
    """A kubelet-style probe: a fresh connection and a 1 s timeout."""
    try:
        return requests.get(url, timeout=1, headers={"Connection": "close"}).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.slow  # a one-minute soak
def test_slow_drip_on_both_listeners_for_a_minute_does_not_starve_probes(launch: Launch) -> None:
    """64 drippers per listener (the probe listener holds 32): the probes, and the product's
    own reads, keep answering in time; slots go to new requests, not to the oldest drip."""
    car = launch()
    car.wait_for(lambda d: d["state"] == "entitled")
    addresses = [_hostport(car.api), _hostport(car.probe)]
    results: dict[str, list[bool]] = {"/readyz": [], "/healthz": [], "/v1/entitlement": []}
    with Drippers(addresses, 64, every=2.0) as drip:
        time.sleep(2.5)  # every dripper connected and sending
        stop = time.monotonic() + 60
        while time.monotonic() < stop:
            results["/readyz"].append(_answers_in_time(car.probe + "/readyz"))
            results["/healthz"].append(_answers_in_time(car.probe + "/healthz"))
            results["/v1/entitlement"].append(_answers_in_time(car.api + "/v1/entitlement"))
            time.sleep(0.2)
        held = len(drip.socks)
    for path, oks in results.items():
        assert len(oks) > 100
        assert sum(oks) >= 0.99 * len(oks), (path, oks.count(False), len(oks))
    assert held >= 120 and drip.reconnects > 128  # the attack ran, and kept coming back
    assert car.get("/healthz").status_code == 200


def _hostport(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def test_huge_header_and_body_are_refused_cleanly(launch: Launch) -> None:
    car = launch()
    r = requests.get(car.api + "/healthz", headers={"X-Big": "a" * 70_000}, timeout=5)
    assert r.status_code in (400, 431)
    r = requests.post(car.api + "/v1/entitlement/challenge", data=b"{" * 1_000_000, timeout=10)
    assert r.status_code == 413
    assert car.get("/healthz").status_code == 200
