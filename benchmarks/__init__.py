"""What every benchmark shares: the install a seller runs, one stand-in environment, the guard.

- `seller_python(extras)`: a virtualenv made with `pip install -c constraints.txt .[extras]`
  (no dev extras: the dev install pulls kubernetes_validate into kubernetes.dynamic), rebuilt
  when the sources change, under .venv/ so `make clean` removes it.
- `stand_in_env(...)`: the environment of every process a benchmark starts, floors included:
  dummy credentials, IMDS off, no AWS config files, the endpoint on loopback, the guard on.
- `guard()`: the loopback guard of tests/loopback_guard.py for this process and its children;
  `guard_report()` ends the run with an error if anything tried to leave the machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import loopback_guard  # noqa: E402

_LOG: str | None = None


def guard() -> str:
    """Install the guard here; the returned log path collects attempts from children too."""
    global _LOG
    if _LOG is None:
        fd, _LOG = tempfile.mkstemp(prefix="bench-loopback-guard-", suffix=".log")
        os.close(fd)
        loopback_guard.install()
        os.environ[loopback_guard.ENV] = _LOG
    return _LOG


def guard_report() -> None:
    """Fail the benchmark if this process or a child tried a non-loopback address."""
    attempts = loopback_guard.blocked + (loopback_guard.read_log(_LOG) if _LOG else [])
    if _LOG:
        os.remove(_LOG)
    if attempts:
        sys.exit("benchmark left loopback (figures invalid):\n" + "\n".join(attempts))
    print("loopback guard: no connection left the machine")


def stand_in_env(endpoint: str, **extra: str) -> dict[str, str]:
    """The one environment for every benchmark subprocess: nothing reachable but loopback."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": tempfile.gettempdir(),
        "LANG": "C.UTF-8",
        "AWS_ENDPOINT_URL_MARKETPLACE_METERING": endpoint,
        "AWS_ENDPOINT_URL_STS": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    env.update(loopback_guard.child_env(guard()))
    env.update(extra)
    return env


def _source_hash(extras: str) -> str:
    digest = hashlib.sha256(extras.encode())
    files = [ROOT / "pyproject.toml", ROOT / "constraints.txt"]
    files += sorted(
        p for p in (ROOT / "sidecar").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def seller_python(extras: str = "") -> Path:
    """The interpreter of `pip install -c constraints.txt .[extras]` in a fresh virtualenv."""
    name = "bench-seller" + (f"-{extras}" if extras else "")
    venv = ROOT / ".venv" / name
    python = venv / "bin" / "python"
    stamp = venv / ".source-hash"
    want = _source_hash(extras)
    if stamp.exists() and stamp.read_text() == want and python.exists():
        return python
    target = "." + (f"[{extras}]" if extras else "")
    print(f"building the seller install: pip install -c constraints.txt '{target}' -> {venv}")
    quiet = ["--quiet", "--disable-pip-version-check"]
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", *quiet, "-c", "constraints.txt"]
    # The client package is the sidecar's dependency from this repository (client/).
    subprocess.run([*pip, "./client", target], check=True, cwd=ROOT)
    # The same version number: force the current sources in without touching dependencies.
    subprocess.run(
        [*pip, "--no-deps", "--force-reinstall", "./client", target], check=True, cwd=ROOT
    )
    for leftover in [ROOT / "build", *ROOT.glob("*.egg-info")]:  # setuptools' in-tree output
        shutil.rmtree(leftover, ignore_errors=True)
    stamp.write_text(want)
    return python


_DESCRIBE = """
import importlib.metadata as m, importlib.util as u, sys
have = []
for n in ["marketplace-sidecar", "boto3", "botocore", "pydantic-settings", "PyJWT", "kubernetes"]:
    try:
        have.append(f"{n} {m.version(n)}")
    except m.PackageNotFoundError:
        pass
print(f"python {sys.version.split()[0]}; " + ", ".join(have))
dev = u.find_spec("kubernetes_validate") is not None
print("kubernetes_validate: " + ("installed (a dev install)" if dev else "absent"))
print("sidecar imported from: " + u.find_spec("sidecar").origin)
"""


def describe_install(python: Path, what: str) -> None:
    """Print which install is measured, so a figure is never mistaken for another install's."""
    out = subprocess.run(
        [str(python), "-c", _DESCRIBE],
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
        env=stand_in_env("http://127.0.0.1:9"),
    )
    print(f"measured install: {what} ({python})")
    for line in out.stdout.splitlines():
        print(f"  {line}")
