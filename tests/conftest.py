from __future__ import annotations

import atexit
import os
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.emulator.service import Emulator, EmulatorServer
from tests import loopback_guard, usage_kit
from tests.helpers import Launch, ManualClock, Sidecar, loopback_env, new_key, start_sidecar
from tests.metadata_fake import MotoSts

# Fixtures several modules share, defined once (the SaaS `backend` and `saas_clock`).
pytest_plugins = ["tests.saas_fixtures"]

# The loopback guard: this process refuses non-loopback connections from here on, and so does
# every Python child, whatever environment a test hands it (PYTHONPATH + LOOPBACK_GUARD_LOG are
# added to it). Attempts land in GUARD_LOG; `_stays_on_loopback` fails the test that made them.
_fd, GUARD_LOG = tempfile.mkstemp(prefix="loopback-guard-", suffix=".log")
os.close(_fd)


@atexit.register
def _remove_guard_log() -> None:
    if os.path.exists(GUARD_LOG):
        os.remove(GUARD_LOG)


loopback_guard.install()
_OWN_PYTHONPATH = os.environ.get("PYTHONPATH")
os.environ.update(loopback_guard.child_env(GUARD_LOG, os.environ.get("PYTHONPATH")))
_popen_init = subprocess.Popen.__init__


# Set-up steps that fetch a tool from the package registry (not test traffic) run unguarded.
REGISTRY_FETCHERS = ("scripts/get-helm.sh", "scripts/client-venv.sh")


def _guarded_popen_init(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
    env = kwargs.get("env")
    argv = args[0] if args else kwargs.get("args")
    first = str(argv[0] if isinstance(argv, list | tuple) and argv else argv)
    if first.endswith(REGISTRY_FETCHERS):
        env = dict(os.environ if env is None else env)
        env.pop(loopback_guard.ENV, None)
        env.pop("PYTHONPATH", None)
        if _OWN_PYTHONPATH is not None:
            env["PYTHONPATH"] = _OWN_PYTHONPATH
        kwargs["env"] = env
    elif env is not None and env.get(loopback_guard.ENV) != GUARD_LOG:
        env = dict(env)
        env.update(loopback_guard.child_env(GUARD_LOG, env.get("PYTHONPATH")))
        kwargs["env"] = env
    _popen_init(self, *args, **kwargs)


subprocess.Popen.__init__ = _guarded_popen_init  # type: ignore[method-assign]


def guard_attempts() -> list[str]:
    """Attempts blocked so far, in this process and its children; clears them."""
    seen = loopback_guard.blocked[:] + loopback_guard.read_log(GUARD_LOG)
    loopback_guard.blocked.clear()
    open(GUARD_LOG, "w").close()
    return seen


# The slow set: chaos, fleet and soak scenarios that wait on real time (minutes in all). `make
# test` deselects them and says so at the end; `make test-slow` runs only them, and `make
# test-all` (what CI runs) everything. Any `-m` expression, or `--slow`, selects by itself.
SLOW_HINT = (
    "slow tests (chaos, fleet and soak scenarios) deselected; run them with `make test-slow`, "
    "or everything with `make test-all` (as CI does), or `pytest --slow`"
)
_SLOW_DESELECTED = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow") or config.option.markexpr:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if not slow:
        return
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if not item.get_closest_marker("slow")]
    config.stash[_SLOW_DESELECTED] = len(slow)
    output = getattr(config, "workeroutput", None)  # a pytest-xdist worker: tell the controller
    if output is not None:
        output["slow_deselected"] = len(slow)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist's controller collects nothing itself: take the count from a worker."""
    count = getattr(node, "workeroutput", {}).get("slow_deselected", 0)
    stash = node.config.stash
    stash[_SLOW_DESELECTED] = max(stash.get(_SLOW_DESELECTED, 0), count)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    count = config.stash.get(_SLOW_DESELECTED, 0)
    if count:
        terminalreporter.write_line(f"{count} {SLOW_HINT}", yellow=True, bold=True)


@pytest.fixture(autouse=True)
def _stays_on_loopback() -> Iterator[None]:
    guard_attempts()
    yield
    attempts = guard_attempts()
    if attempts:
        pytest.fail("left loopback:\n" + "\n".join(attempts), pytrace=False)


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


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """A real PostgreSQL server (Debian's package), started once for the session."""
    from tests.pg import PgServer

    server = PgServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def moto_sts() -> Iterator[MotoSts]:
    """moto's STS server, started once: each stop waits ~0.5 s for its serving loop."""
    server = MotoSts()
    yield server
    server.close()


@pytest.fixture
def sts(moto_sts: MotoSts) -> MotoSts:
    """moto's STS for one test: `assumed()` lists only the roles this test assumed."""
    moto_sts.forget()
    return moto_sts


@pytest.fixture
def pg_url(pg_server: Any) -> str:
    """A fresh empty database on the session's server."""
    return str(pg_server.new_database())


@pytest.fixture
def clock(
    emulator: Emulator, emulator_server: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> ManualClock:
    """Custom-mode usage tests: a manual clock shared by the service and the emulator's
    MeterUsage window, boto3 pointed at the emulator as a pod of its own. A module that needs
    another `clock` defines its own."""
    c = ManualClock()
    emulator.meter_clock = c.time
    usage_kit.aws_env(monkeypatch, emulator_server, "pod-" + str(id(c)))
    return c
