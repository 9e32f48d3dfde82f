"""Shared test helpers: keys, tokens, a manual clock, and the real sidecar process on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000.0


def new_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def sign(key: Any, claims: dict[str, Any], alg: str = "PS256", **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers=headers or None)


def claims(nonce: str = "n-1", iat: Any = NOW, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "productCode": "prod-abc",
        "publicKeyVersion": 1,
        "nonce": nonce,
        "iat": int(iat) if type(iat) is float else iat,
    }
    base.update(over)
    return base


class ManualClock:
    """Wall and monotonic time that only move when the code under test waits."""

    def __init__(self, stop_after_waits: int | None = None) -> None:
        self.t = NOW
        self.mono = 0.0
        self.waits: list[float] = []
        self.stop_after_waits = stop_after_waits

    def time(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.mono

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        self.waits.append(seconds)
        self.t += seconds
        self.mono += seconds
        if self.stop_after_waits is not None and len(self.waits) >= self.stop_after_waits:
            stop.set()
        return stop.is_set()


def _port_block() -> range:
    """This process's own block of ports, below the kernel's ephemeral range.

    A port found free with bind(0) comes from the ephemeral range, where every outgoing
    connection of the machine also takes its local port: with parallel test workers, one of
    them (or any client) could take it before the sidecar binds it. Below that range only
    explicit binds land, and each pytest-xdist worker has a block of its own."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    index = int(worker) if worker.isdigit() else 0
    size, first = 1000, 16000
    blocks = max(1, (ephemeral_low - first) // size)
    low = first + (index % blocks) * size
    return range(low, low + size)


_PORTS = _port_block()
_next_port = [os.getpid() % len(_PORTS)]  # another run beside this one starts elsewhere


def free_port() -> int:
    """A loopback port nobody holds now and nobody else is handed (see `_port_block`)."""
    if _PORTS.start + len(_PORTS) > 65535 or _PORTS.start < 1024:  # odd machine: the old way
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for _ in range(len(_PORTS)):
        port = _PORTS[_next_port[0] % len(_PORTS)]
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1}")


def loopback_env(endpoint: str, **extra: str) -> dict[str, str]:
    """An environment that can reach nothing but loopback stand-ins."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "AWS_ENDPOINT_URL_MARKETPLACE_METERING": endpoint,
        "AWS_ACCESS_KEY_ID": "pod-" + str(time.monotonic_ns()),
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


@dataclass
class Sidecar:
    proc: subprocess.Popen[str]
    api: str
    probe: str
    stderr_lines: list[str] = field(default_factory=list)

    def get(self, path: str, *, probe: bool = False) -> requests.Response:
        return requests.get((self.probe if probe else self.api) + path, timeout=5)

    def entitlement(self) -> dict[str, Any]:
        body: dict[str, Any] = self.get("/v1/entitlement").json()
        return body

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            doc = self.entitlement()
            if predicate(doc):
                return doc
            time.sleep(0.05)
        raise AssertionError(f"condition not met in {timeout}s; last: {json.dumps(doc)[:600]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=5)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def logs(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


def start_sidecar(env: dict[str, str], *, wait: bool = True) -> Sidecar:
    api_port, probe_port = free_port(), free_port()
    env = {
        "MARKETPLACE_PRODUCT_CODE": "prod-abc",
        "MARKETPLACE_LISTEN": f"127.0.0.1:{api_port}",
        "MARKETPLACE_PROBE_LISTEN": f"127.0.0.1:{probe_port}",
        "MARKETPLACE_BACKOFF_BASE_SECONDS": "0.05",
        "MARKETPLACE_BACKOFF_CAP_SECONDS": "0.2",
        "MARKETPLACE_THROTTLE_SCHEDULE_SECONDS": "0.1,0.2,0.3",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    car = Sidecar(proc, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{probe_port}")
    if wait:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"sidecar exited {proc.returncode}: {car.logs()}")
            try:
                car.get("/healthz")
                return car
            except requests.ConnectionError:
                time.sleep(0.05)
        car.stop()
        raise AssertionError("sidecar did not start")
    return car


class Launch(Protocol):
    def __call__(self, **env: str) -> Sidecar: ...
