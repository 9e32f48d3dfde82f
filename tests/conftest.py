from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import Launch, Sidecar, loopback_env, new_key, start_sidecar


@pytest.fixture(scope="session")
def key() -> rsa.RSAPrivateKey:
    return new_key()


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[EmulatorServer]:
    server = EmulatorServer(Emulator(seed=7)).start()
    yield server
    server.shutdown()


@pytest.fixture
def emulator(emulator_server: EmulatorServer) -> Emulator:
    emulator_server.emulator.reset()
    return emulator_server.emulator


@pytest.fixture
def sidecars(emulator_server: EmulatorServer) -> Iterator[list[Sidecar]]:
    """Start real `run` processes wired to the emulator; all are stopped afterwards."""
    started: list[Sidecar] = []
    yield started
    for car in started:
        car.stop()


@pytest.fixture
def launch(emulator_server: EmulatorServer, emulator: Emulator, sidecars: list[Sidecar]) -> Launch:
    def _launch(**env: str) -> Sidecar:
        base = loopback_env(emulator_server.url, MARKETPLACE_PUBLIC_KEY=emulator.public_pem())
        base.update(env)
        car = start_sidecar(base)
        sidecars.append(car)
        return car

    return _launch
