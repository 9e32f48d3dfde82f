"""The loopback guard: a test (or a child it starts) that tries to leave the machine fails."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import guard_attempts
from tests.loopback_guard import LeftLoopbackError, is_loopback

IMDS = ("169.254.169.254", 80)


@pytest.mark.parametrize(
    "address",
    [IMDS, ("169.254.170.2", 80), ("10.0.0.1", 443), ("192.0.2.1", 443), ("2001:db8::1", 443)],
)
def test_connect_outside_loopback_raises_a_clear_error(address: tuple[str, int]) -> None:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family) as s, pytest.raises(LeftLoopbackError, match="loopback guard"):
        s.connect(address)
    with socket.socket(family) as s, pytest.raises(LeftLoopbackError):
        s.connect_ex(address)
    with pytest.raises(LeftLoopbackError, match=address[0]):
        socket.create_connection(address, timeout=1)
    assert len(guard_attempts()) == 3  # recorded too, so a swallowed error still fails the test


def test_name_lookup_of_an_outside_host_is_refused() -> None:
    with pytest.raises(LeftLoopbackError, match="name lookup"):
        socket.getaddrinfo("metering.marketplace.us-east-1.amazonaws.com", 443)
    assert guard_attempts()


def test_udp_sendto_outside_loopback_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(LeftLoopbackError):
        s.sendto(b"x", ("8.8.8.8", 53))
    assert guard_attempts()


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_tcp_still_works(host: str) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.handle_request, daemon=True).start()
    with socket.create_connection((host, server.server_address[1]), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.0 204")
    server.server_close()


def _has_ipv6_loopback() -> bool:
    """::1 is configured (the kernel lists it on `lo`); a container may have IPv6 switched off."""
    try:
        with open("/proc/net/if_inet6") as f:
            return any(line.split()[0] == "0" * 31 + "1" for line in f if line.strip())
    except FileNotFoundError:
        return False


def test_ipv6_loopback_still_works() -> None:
    if not _has_ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1 missing from /proc/net/if_inet6)")
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::1", 0))
        listener.listen(1)
        with socket.create_connection(("::1", listener.getsockname()[1]), timeout=5):
            pass
    assert guard_attempts() == []


def test_unix_sockets_still_work() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s")
        with socket.socket(socket.AF_UNIX) as srv, socket.socket(socket.AF_UNIX) as cli:
            srv.bind(path)
            srv.listen(1)
            cli.connect(path)
    assert guard_attempts() == []


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.1.2.3", "::1", "localhost", "0.0.0.0", "::ffff:127.0.0.1", None],  # noqa: S104
)
def test_local_addresses_are_loopback(host: str | None) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["169.254.169.254", "10.1.1.1", "::ffff:10.0.0.1", "example.com"])
def test_other_addresses_are_not(host: str) -> None:
    assert not is_loopback(host)


def test_a_child_with_its_own_environment_is_guarded_too() -> None:
    """The issue's leak: boto3's credential chain calling IMDS from a child with no credentials."""
    env = {"PATH": os.environ["PATH"], "HOME": str(Path.home()), "AWS_CONFIG_FILE": "/dev/null"}
    env["AWS_SHARED_CREDENTIALS_FILE"] = "/dev/null"
    code = (
        "import boto3\n"
        "print(boto3.Session(region_name='us-east-1').get_credentials())\n"
        "import socket\n"
        "socket.create_connection(('169.254.169.254', 80), timeout=1)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "LeftLoopbackError" in out.stderr and "169.254.169.254:80" in out.stderr
    attempts = guard_attempts()
    # botocore swallowed its own IMDS attempt (credentials: None); the log still has it.
    assert out.stdout.strip() == "None"
    assert sum("169.254.169.254" in a for a in attempts) >= 2, attempts
