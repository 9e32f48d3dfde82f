"""Refuse every connection that would leave the machine, in tests and benchmarks.

Installed in the test process by tests/conftest.py and in every Python child of a test or a
benchmark through tests/loopback_site/sitecustomize.py (on PYTHONPATH, switched on by the
`LOOPBACK_GUARD_LOG` variable). A blocked attempt raises `LeftLoopbackError` and is also
appended to the log file named by that variable: libraries such as botocore swallow connection
errors (the credential chain quietly moves on from IMDS), so the test fixture and the
benchmarks read the log afterwards and fail loudly on any entry.

Allowed: 127.0.0.0/8, ::1, the unspecified addresses (they mean this host), "localhost", unix
sockets and every non-IP family. Kept free of heavy imports: benchmark floors load it too.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

ENV = "LOOPBACK_GUARD_LOG"
_ANY4 = "0.0.0." + "0"  # the unspecified address: connecting to it reaches this host
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", ""})

blocked: list[str] = []  # attempts of this process that could not go to the log


class LeftLoopbackError(PermissionError):
    """A test or benchmark tried to reach an address outside this machine."""


def is_loopback(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    name = host.strip().lower().split("%", 1)[0]  # drop an IPv6 zone id
    if name.endswith(".") and name[:-1] in _LOCAL_NAMES:  # "localhost." is the same name, rooted
        name = name[:-1]
    if name in _LOCAL_NAMES or name.startswith("127."):
        return True
    if name.startswith("::ffff:"):  # IPv4-mapped IPv6
        return name[7:].startswith("127.") or name[7:] == _ANY4
    return name in {_ANY4, "::1", "::", "0:0:0:0:0:0:0:1", "0:0:0:0:0:0:0:0"}


def _refuse(what: str, host: object, port: object) -> None:
    detail = (
        f"loopback guard: {what} to {host}:{port} refused; tests and benchmarks talk to "
        "loopback only (point the client at a local stand-in, or set "
        "AWS_EC2_METADATA_DISABLED=true and dummy credentials)"
    )
    path = os.environ.get(ENV)
    try:
        if not path:
            raise OSError
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"pid {os.getpid()}: {detail}\n")
    except OSError:
        blocked.append(detail)
    raise LeftLoopbackError(detail)


def _check(sock: socket.socket, address: Any, what: str) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        host, port = address[0], address[1] if len(address) > 1 else None
        if not is_loopback(host):
            _refuse(what, host, port)


def install() -> None:
    """Patch socket connect/connect_ex/sendto and getaddrinfo; idempotent."""
    if getattr(socket, "_loopback_guard", False):
        return
    connect: Callable[..., Any] = socket.socket.connect
    connect_ex: Callable[..., Any] = socket.socket.connect_ex
    sendto: Callable[..., Any] = socket.socket.sendto
    getaddrinfo: Callable[..., Any] = socket.getaddrinfo

    def guarded_connect(self: socket.socket, address: Any) -> None:
        _check(self, address, "connect")
        connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        _check(self, address, "connect")
        return int(connect_ex(self, address))

    def guarded_sendto(self: socket.socket, *args: Any) -> int:
        _check(self, args[-1], "sendto")
        return int(sendto(self, *args))

    def guarded_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        # A name lookup of an outside host is itself traffic to the resolver.
        if not is_loopback(host) and not _numeric(host):
            _refuse("name lookup", host, port)
        return getaddrinfo(host, port, *args, **kwargs)

    socket.socket.connect = guarded_connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = guarded_connect_ex  # type: ignore[method-assign,assignment]
    socket.socket.sendto = guarded_sendto  # type: ignore[method-assign,assignment]
    socket.getaddrinfo = guarded_getaddrinfo
    socket._loopback_guard = True  # type: ignore[attr-defined]


def _numeric(host: object) -> bool:
    """A literal address: resolving it needs no resolver (connect is checked separately)."""
    text = host.decode("ascii", "replace") if isinstance(host, bytes) else host
    if not isinstance(text, str):
        return False
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text.split("%")[0])
    except OSError:
        return False
    return True


def child_env(log_path: str, pythonpath: str | None = None) -> dict[str, str]:
    """The variables that make a Python child install the guard and report to `log_path`."""
    site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loopback_site")
    path = site if not pythonpath else site + os.pathsep + pythonpath
    return {ENV: log_path, "PYTHONPATH": path}


def read_log(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as log:
            return [line.rstrip("\n") for line in log if line.strip()]
    except FileNotFoundError:
        return []
