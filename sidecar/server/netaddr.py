"""`host:port` parsing shared by the daemon's config and the dependency-free `probe` command."""

from __future__ import annotations


def parse_hostport(value: str) -> tuple[str, int]:
    """Split `host:port` (IPv6 as `[::1]:port`); raise ValueError saying what is allowed."""
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{value!r} is not host:port (for example 127.0.0.1:8787)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 host in brackets, e.g. [::1]:8787")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{value!r}: port must be 1-65535")
    return host, port


def connect_host(host: str) -> str:
    """The address a local client dials to reach a server bound to `host`."""
    if host in ("0.0.0.0", ""):  # noqa: S104  # nosec B104 # a wildcard bind dialled on loopback
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host
