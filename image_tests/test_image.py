"""The built image, run with buildah (chroot isolation, host loopback network): it reports its
version, runs as UID 10001, serves `run` + `probe` against the emulator, and writes nothing to
its root filesystem (so it works read-only). Run by `make image-test`, which builds it first."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import free_port

IMAGE = os.environ.get("SIDECAR_IMAGE", "localhost/marketplace-sidecar:ci")
BUILDAH = ["buildah", "--storage-driver", "vfs"]


def buildah(*args: str, timeout: float = 120) -> str:
    out = subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def container() -> Iterator[str]:
    name = buildah("from", "--quiet", IMAGE)
    yield name
    buildah("rm", name)


def run_in(container: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BUILDAH, "run", "--isolation", "chroot", container, "--", *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_version_and_non_root_user(container: str) -> None:
    assert (
        run_in(container, "marketplace-sidecar", "--version").stdout.strip()
        == "marketplace-sidecar 0.1.0"
    )
    ids = run_in(container, "python3", "-c", "import os; print(os.getuid(), os.getgid())")
    assert ids.stdout.split() == ["10001", "10001"]
    config = buildah(
        "inspect",
        "--type",
        "image",
        "--format",
        "{{.Docker.Config.User}} {{.Docker.Config.Entrypoint}}",
        IMAGE,
    )
    assert config == "10001:10001 [marketplace-sidecar]"
    healthcheck = buildah(
        "inspect", "--type", "image", "--format", "{{.Docker.Config.Healthcheck.Test}}", IMAGE
    )
    assert healthcheck == "[CMD marketplace-sidecar probe]"


def test_no_build_tools_or_caches_in_the_image(container: str) -> None:
    found = run_in(
        container,
        "sh",
        "-c",
        "ls /opt/sidecar/bin; ls /root/.cache 2>/dev/null; command -v gcc cc || true",
    )
    names = found.stdout.split()
    assert "pip" not in names and "gcc" not in names and "marketplace-sidecar" in names
    assert run_in(container, "test", "-e", "/src").returncode != 0


def test_run_and_probe_inside_the_image_write_nothing(container: str, tmp_path: Path) -> None:
    emulator = EmulatorServer(Emulator()).start()
    api, probe = free_port(), free_port()
    root = buildah("mount", container)
    marker = tmp_path / "marker"
    marker.touch()
    time.sleep(0.05)
    env = [
        f"AWS_ENDPOINT_URL_MARKETPLACE_METERING={emulator.url}",
        "AWS_ACCESS_KEY_ID=image-test",
        "AWS_SECRET_ACCESS_KEY=x",
        "AWS_REGION=us-east-1",
        "AWS_EC2_METADATA_DISABLED=true",
        "MARKETPLACE_PRODUCT_CODE=prod-abc",
        f"MARKETPLACE_PUBLIC_KEY={emulator.emulator.public_pem()}",
        f"MARKETPLACE_LISTEN=127.0.0.1:{api}",
        f"MARKETPLACE_PROBE_LISTEN=127.0.0.1:{probe}",
    ]
    daemon = subprocess.Popen(
        [
            *BUILDAH,
            "run",
            "--isolation",
            "chroot",
            container,
            "--",
            "env",
            *env,
            "marketplace-sidecar",
            "run",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        ready = 1
        while time.monotonic() < deadline and ready != 0:
            ready = run_in(
                container, "marketplace-sidecar", "probe", "--address", f"127.0.0.1:{probe}"
            ).returncode
            time.sleep(0.2)
        assert ready == 0
        doc = requests.get(f"http://127.0.0.1:{api}/v1/entitlement", timeout=5).json()
        assert doc["state"] == "entitled"
        assert emulator.emulator.calls[-1]["pod"] == "image-test"
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        emulator.shutdown()
    changed = subprocess.run(
        ["find", root, "-xdev", "-newer", str(marker), "-not", "-type", "d", "-print"],
        capture_output=True,
        text=True,
    ).stdout.split()
    ignored = (
        "/dev/",
        "/proc/",
        "/sys/",
        "/run/",
        "/etc/resolv.conf",
        "/etc/hosts",
        "/etc/hostname",
    )
    written = [p for p in changed if not any(i in p.removeprefix(root) for i in ignored)]
    assert written == [], written
    buildah("umount", container)


def test_base_is_debian_bookworm_with_debians_python(container: str) -> None:
    """The README states what the image carries: Debian 12 and Debian's CPython 3.11, and no
    pip or venv wheels left in the runtime stage."""
    debian = run_in(container, "cat", "/etc/debian_version").stdout.strip()
    assert debian.split(".")[0] == "12", debian
    version = run_in(container, "python3", "-c", "import sys; print(sys.version_info[:2])")
    assert version.stdout.strip() == "(3, 11)"
    wheels = run_in(container, "sh", "-c", "ls /usr/share/python-wheels 2>/dev/null || true")
    assert wheels.stdout.strip() == ""
