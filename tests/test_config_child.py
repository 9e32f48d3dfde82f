"""`run` validates its settings in a forked child: the daemon never holds pydantic in memory,
and every way that child can fail still ends in exit 2 with nothing bound."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import ROOT, free_port, loopback_env, start_sidecar

LIBRARIES = ("_pydantic_core", "/pydantic", "_asyncio")  # asyncio: pydantic_settings imports it


@pytest.fixture
def env(emulator_server: EmulatorServer, emulator: Emulator) -> dict[str, str]:
    return loopback_env(
        emulator_server.url,
        MARKETPLACE_PRODUCT_CODE="prod-abc",
        MARKETPLACE_PUBLIC_KEY=emulator.public_pem(),
        MARKETPLACE_LISTEN=f"127.0.0.1:{free_port()}",
        MARKETPLACE_PROBE_LISTEN=f"127.0.0.1:{free_port()}",
    )


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _in_process(env: dict[str, str]) -> list[str]:
    """What `load()` (doctor, verify-token: pydantic in their own process) reports."""
    script = (
        "import json\n"
        "from sidecar.config import ConfigError, load\n"
        "try:\n    load(); print('[]')\n"
        "except ConfigError as e:\n    print(json.dumps(e.problems))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [f"config error: {p}" for p in json.loads(out.stdout)]


def _bound_nothing(env: dict[str, str], stderr: str) -> None:
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "listening" not in events
    for variable in ("MARKETPLACE_LISTEN", "MARKETPLACE_PROBE_LISTEN"):
        host, port = env[variable].rsplit(":", 1)
        with socket.socket() as s:
            s.bind((host, int(port)))


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def _run_until_validating(
    env: dict[str, str], *, start_new_session: bool = False
) -> tuple[subprocess.Popen[str], list[int]]:
    """`run` started, once its validating child exists (the child's pid first)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=start_new_session,
    )
    deadline = time.monotonic() + 10
    while not (children := _children(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.001)
    if not children:
        proc.kill()
        proc.wait()
    assert children, "no validating child seen"
    return proc, children


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).ok
    except requests.ConnectionError:
        return False


def _own_ports(env: dict[str, str]) -> dict[str, str]:
    """start_sidecar chooses the listeners (and knows them)."""
    return {k: v for k, v in env.items() if not k.endswith("LISTEN")}


def test_the_running_sidecar_never_holds_pydantic(env: dict[str, str], emulator: Emulator) -> None:
    car = start_sidecar(_own_ports(env))
    try:
        car.wait_for(lambda doc: doc.get("entitled") is True)
        with open(f"/proc/{car.proc.pid}/maps") as f:
            maps = f.read()
        assert "_rust.abi3" in maps  # the check below can see a native module
        assert [lib for lib in LIBRARIES if lib in maps] == []
        assert _children(car.proc.pid) == []  # the validating child is gone
    finally:
        assert car.stop() == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"MARKETPLACE_PRODUCT_CODE": "bad code", "MARKETPLACE_CLOCK_SKEW_SECOND": "30"},
        {"MARKETPLACE_LISTEN": "0.0.0.0:8787", "MARKETPLACE_REGISTER_JITTER": "0.9"},
        {"MARKETPLACE_PUBLIC_KEY": "", "MARKETPLACE_MODE": "custom"},
        {"MARKETPLACE_PUBLIC_KEY": "not a pem"},
        {
            "MARKETPLACE_MODE": "saas",
            "MARKETPLACE_DIMENSIONS": "users",
            "MARKETPLACE_USAGE_DATABASE_URL": "postgresql://app:s3cr%zzet@db:5432/usage",
        },
    ],
    ids=["field", "two-fields", "mode", "key", "secret"],
)
def test_a_bad_setting_exits_2_with_the_lines_of_the_in_process_check(
    env: dict[str, str], emulator: Emulator, bad: dict[str, str]
) -> None:
    env.update(bad)
    out = _run(env)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("config error: ")]
    assert errors and errors == _in_process(env)
    assert "s3cr" not in out.stderr
    _bound_nothing(env, out.stderr)
    assert emulator.calls == []


def test_problems_larger_than_a_pipe_buffer_all_arrive(env: dict[str, str]) -> None:
    """~2,000 misspelled variables: ~170 KiB of lines, more than the pipe holds at once."""
    env.update({f"MARKETPLACE_NO_SUCH_SETTING_{i:04}": "x" for i in range(2000)})
    out = _run(env)
    assert out.returncode == 2, out.stderr[-300:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("config error: ")]
    assert len(errors) == 2000
    assert errors[-1].startswith("config error: MARKETPLACE_NO_SUCH_SETTING_1999: unknown")
    _bound_nothing(env, out.stderr)


def test_a_value_larger_than_a_pipe_buffer_reaches_the_daemon(env: dict[str, str]) -> None:
    env["MARKETPLACE_POD_NAME"] = "p" * 100_000  # one variable may hold up to 128 KiB
    car = start_sidecar(_own_ports(env), wait=False)
    logged: list[str] = []  # drained while it runs: its log line is larger than a pipe too
    reader = threading.Thread(target=lambda: logged.append(car.logs()))
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while not _answers(car.api) and time.monotonic() < deadline:
            time.sleep(0.05)
        car.wait_for(lambda doc: doc.get("entitled") is True)
    finally:
        assert car.stop() == 0
        reader.join(10)
    started = [
        json.loads(line)
        for line in logged[0].splitlines()
        if line.startswith("{") and json.loads(line)["event"] == "starting"
    ]
    assert started[0]["config"]["MARKETPLACE_POD_NAME"] == "p" * 100_000


def test_a_killed_validating_child_is_a_config_error(
    env: dict[str, str], emulator: Emulator
) -> None:
    proc, children = _run_until_validating(env)
    try:
        os.kill(children[0], signal.SIGKILL)  # pydantic's import alone takes far longer
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("config error: ")]
    assert errors == [
        f"config error: the configuration check (process {children[0]}) was killed by signal "
        "9 (SIGKILL) before it finished; nothing was started"
    ]
    assert "Traceback" not in stderr
    _bound_nothing(env, stderr)
    assert emulator.calls == []


def test_with_threads_running_the_settings_are_checked_in_process(env: dict[str, str]) -> None:
    """fork() would copy one thread and whatever locks the others hold: never fork then."""
    env["MARKETPLACE_PRODUCT_CODE"] = "bad code"
    script = (
        "import sys, threading\n"
        "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
        "from sidecar.cli import main\n"
        "code = main(['run'])\n"
        "print(code, 'pydantic' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.stdout.split() == ["2", "True"], out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("config error: ")]
    assert errors == _in_process(env)


def test_sigterm_to_the_group_during_validation_is_a_clean_stop(
    env: dict[str, str], emulator: Emulator
) -> None:
    """Ctrl-C, `docker stop` through an init that signals the group, a group kill: the child
    dies of the signal meant for both. That is a requested stop (exit 0), not a config error."""
    proc, children = _run_until_validating(env, start_new_session=True)
    try:
        time.sleep(0.05)  # past the child's first lines (its own SIGTERM disposition)
        # Frozen, the child cannot finish validating before the signal lands, however fast
        # the machine: the parent is still waiting for its answer, nothing bound yet.
        os.kill(children[0], signal.SIGSTOP)
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.1)
        # The parent may already have killed and reaped it (its stop path does not wait for a
        # frozen child): then there is nothing left to thaw.
        with contextlib.suppress(ProcessLookupError):
            os.kill(children[0], signal.SIGCONT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "config error" not in stderr
    assert not os.path.exists(f"/proc/{children[0]}")  # reaped, not left behind
    _bound_nothing(env, stderr)
    assert emulator.calls == []


_COMPARE = """
import json, sys
from sidecar.config import SPECS, ConfigError
from sidecar.config_child import start

def outcome(check):
    try:
        s = check()
    except ConfigError as exc:
        return {"problems": exc.problems}
    return {
        "values": {n: [type(getattr(s, n)).__name__, repr(getattr(s, n))] for n in SPECS},
        "explicit": sorted(s.explicit),
    }

child = start()
assert child.pid is not None  # really forked
try:
    forked = outcome(child.result)
finally:
    child.close()
assert "pydantic" not in sys.modules  # the parent never validated itself
from sidecar.config_validate import validate
print(json.dumps({"run": forked, "load": outcome(validate)}))
"""


@pytest.mark.parametrize(
    "extra",
    [
        {  # hourly: floats that JSON could bend, an optional int, optional floats
            "MARKETPLACE_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\\nx",
            "MARKETPLACE_FLEET_SIZE": " 40 ",
            "MARKETPLACE_REGISTER_JITTER": "1e-7",
            "MARKETPLACE_TEST_ONLY_TIME_ORIGIN": "-inf",
            "MARKETPLACE_TEST_ONLY_TIME_SCALE": "99999.99999999999",
            "MARKETPLACE_DRAIN_SECONDS": "0.30000000000000004",
            "MARKETPLACE_POD_NAME": "p\u00e9\u4e2d\U0001f600" + "x" * 5000,
            "MARKETPLACE_LOG_LEVEL": "DEBUG",
        },
        {  # custom: a path with odd characters, undecodable bytes kept as surrogates
            "MARKETPLACE_MODE": "custom",
            "MARKETPLACE_DIMENSIONS": "users, sc\u00e4ns",
            "MARKETPLACE_STATE_DIR": "/tmp//x y/\u00e9\\n/./",
            "MARKETPLACE_PUBLIC_KEY_FILE": "",
            "MARKETPLACE_ENTITLEMENT_CHECK": "dry_run",
            "MARKETPLACE_READINESS_GATE": "",
        },
        {  # saas: defaults set explicitly (a shared template), a database URL, a blank fleet
            "MARKETPLACE_MODE": "saas",
            "MARKETPLACE_DIMENSIONS": "users",
            "MARKETPLACE_USAGE_DATABASE_URL": "postgresql://app:p%40ss@db:5432/usage",
            "MARKETPLACE_REGISTER_INTERVAL_SECONDS": "3600",
            "MARKETPLACE_FLEET_SIZE": "",
            "MARKETPLACE_ZERO_USAGE_RECORDS": "false",
        },
        {  # saas refusing a foreign setting: the refusal depends on `explicit`
            "MARKETPLACE_MODE": "saas",
            "MARKETPLACE_DIMENSIONS": "users",
            "MARKETPLACE_STATE_DIR": "/tmp",
            "MARKETPLACE_FLEET_SIZE": "3",
        },
        {  # hourly refusing saas settings, and a bad fleet size
            "MARKETPLACE_PUBLIC_KEY": "k",
            "MARKETPLACE_SAAS_IDENTITY": "customer_identifier",
            "MARKETPLACE_FLEET_SIZE": "1e3",
        },
    ],
    ids=["hourly", "custom", "saas", "saas-foreign", "hourly-refused"],
)
def test_run_and_load_see_the_same_settings_field_by_field(extra: dict[str, str]) -> None:
    """`run` gets its settings back through JSON from the forked child; doctor and
    verify-token validate in-process. Same environment, same settings (types included)."""
    env = loopback_env("http://127.0.0.1:9", MARKETPLACE_PRODUCT_CODE="prod-abc", **extra)
    env_bytes = {k.encode(): v.encode() for k, v in env.items()}
    if extra.get("MARKETPLACE_MODE") == "custom":
        env_bytes[b"MARKETPLACE_POD_NAME"] = b"pod-\xff\xfe"  # not UTF-8
    out = subprocess.run(
        [sys.executable, "-c", _COMPARE],
        env=env_bytes,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["run"] == seen["load"]
    if "problems" in seen["run"]:
        assert any("MARKETPLACE_FLEET_SIZE" in line for line in seen["run"]["problems"])
    else:
        variables = {k.decode() for k in env_bytes if k.startswith(b"MARKETPLACE_")}
        assert {f"MARKETPLACE_{n.upper()}" for n in seen["run"]["explicit"]} == variables
