"""The built image, run with buildah (chroot isolation, host loopback network): it reports its
version, runs as UID 10001, serves `run` + `probe` against the emulator, and writes nothing to
its root filesystem (so it works read-only). Run by `make image-test`, which builds it first."""

from __future__ import annotations

import json
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


STATE = "/var/lib/marketplace-sidecar"


def fargate_bind_volume(container: str, tmp_path: Path) -> Path:
    """An empty Fargate bind volume for `STATE`, as ECS makes it (platform 1.4.0+): a new
    directory owned by root, mode 0755; when the image declares the same path as a VOLUME, the
    ECS data plane copies the image's directory (its owner and mode) onto it (AWS, "Use bind
    mounts with Amazon ECS"). Fargate cannot run here, so this applies that rule to a host
    directory, reading the image's own config and directory."""
    volume = tmp_path / "fargate-volume"
    volume.mkdir(mode=0o755)
    os.chown(volume, 0, 0)
    volume.chmod(0o755)
    declared = buildah(
        "inspect", "--type", "image", "--format", "{{.Docker.Config.Volumes}}", IMAGE
    )
    root = Path(buildah("mount", container))
    if STATE in declared:
        source = (root / STATE.lstrip("/")).stat()
        os.chown(volume, source.st_uid, source.st_gid)
        volume.chmod(source.st_mode & 0o7777)
    return volume


def test_custom_mode_starts_as_10001_on_an_empty_fargate_volume(
    container: str, tmp_path: Path
) -> None:
    """manifests/ecs/task-definition-custom.json: user 10001:10001, an empty bind volume at the
    state directory. The image must make that volume writable for UID 10001 by itself."""
    volume = fargate_bind_volume(container, tmp_path)
    emulator = EmulatorServer(Emulator()).start()
    api, probe = free_port(), free_port()
    env = [
        f"AWS_ENDPOINT_URL_MARKETPLACE_METERING={emulator.url}",
        "AWS_ACCESS_KEY_ID=image-test",
        "AWS_SECRET_ACCESS_KEY=x",
        "AWS_REGION=us-east-1",
        "AWS_EC2_METADATA_DISABLED=true",
        "MARKETPLACE_MODE=custom",
        "MARKETPLACE_PRODUCT_CODE=prod-abc",
        "MARKETPLACE_DIMENSIONS=requests",
        f"MARKETPLACE_STATE_DIR={STATE}",
        f"MARKETPLACE_LISTEN=127.0.0.1:{api}",
        f"MARKETPLACE_PROBE_LISTEN=127.0.0.1:{probe}",
    ]
    daemon = subprocess.Popen(
        [
            *BUILDAH,
            "run",
            "--isolation",
            "chroot",
            "--user",
            "10001:10001",
            "--volume",
            f"{volume}:{STATE}",
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
        while time.monotonic() < deadline and ready != 0 and daemon.poll() is None:
            ready = run_in(
                container, "marketplace-sidecar", "probe", "--address", f"127.0.0.1:{probe}"
            ).returncode
            time.sleep(0.2)
        exited = daemon.poll()
        assert exited is None and ready == 0, (exited, daemon.stderr and daemon.stderr.read())
        doc = requests.get(f"http://127.0.0.1:{api}/v1/entitlement", timeout=5).json()
        assert doc["state"] == "entitled"
        # The usage store lives on the volume, written by UID 10001.
        assert [p.stat().st_uid for p in volume.iterdir()] != []
        assert {p.stat().st_uid for p in volume.iterdir()} == {10001}
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        emulator.shutdown()
        buildah("umount", container)


SBOM_IN_IMAGE = "/usr/share/doc/marketplace-sidecar/sbom.cdx.json"
SBOM_OUT = Path(
    os.environ.get("SBOM_OUT", Path(__file__).parent.parent / "dist/marketplace-sidecar.cdx.json")
)


def _pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    pins = {}
    for line in (Path(__file__).parent.parent / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if version:
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_the_sbom_lists_every_runtime_package_at_its_pinned_version(container: str) -> None:
    shipped = run_in(container, "cat", SBOM_IN_IMAGE)
    assert shipped.returncode == 0, shipped.stderr
    sbom = json.loads(shipped.stdout)
    assert sbom["bomFormat"] == "CycloneDX"
    listed = {
        c["name"].lower().replace("_", "-"): (c["version"], c["purl"]) for c in sbom["components"]
    }
    # What the image's Python environment really holds, asked inside the image.
    installed = json.loads(
        run_in(
            container,
            "python3",
            "-c",
            "import importlib.metadata as m, json; print(json.dumps({d.metadata['Name']: "
            "d.version for d in m.distributions()}))",
        ).stdout
    )
    pins = _pins()
    ours = {"marketplace-sidecar", "marketplace-sidecar-client"}
    assert {n.lower().replace("_", "-") for n in installed} == set(listed)
    for name, version in installed.items():
        key = name.lower().replace("_", "-")
        assert listed[key][0] == version
        assert listed[key][1] == f"pkg:pypi/{key}@{version}"
        if key in ours:
            assert version == "0.1.0"
        else:
            assert pins[key] == version, f"{name} {version} is not the pinned {pins.get(key)}"
    assert {"boto3", "botocore", "pyjwt", "cryptography", "pydantic"} <= set(listed)
    assert "cyclonedx-bom" not in listed and "pip" not in listed  # the tool stays in the build
    assert run_in(container, "sh", "-c", "command -v cyclonedx-py").returncode != 0


def test_the_build_output_holds_the_same_sbom_as_the_image(container: str) -> None:
    shipped = run_in(container, "cat", SBOM_IN_IMAGE).stdout
    assert SBOM_OUT.read_text() == shipped
