"""Command line. Each command imports only what it needs: `probe` must stay fast."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sidecar import __version__

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    from sidecar.config import Settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="marketplace-sidecar",
        description="AWS Marketplace RegisterUsage sidecar (configuration: MARKETPLACE_* "
        "environment variables, see the README)",
    )
    p.add_argument("--version", action="version", version=f"marketplace-sidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the sidecar daemon")
    pr = sub.add_parser("probe", help="exit 0 iff the sidecar is ready (for health checks)")
    pr.add_argument("--path", default="/readyz", choices=["/readyz", "/healthz"])
    pr.add_argument("--address", help="host:port (default: MARKETPLACE_PROBE_LISTEN)")
    pr.add_argument("--timeout", type=float, default=2.0)
    vt = sub.add_parser("verify-token", help="verify a RegisterUsage token read from stdin")
    vt.add_argument("--nonce", help="the nonce that was sent (strongly recommended)")
    vt.add_argument("--max-age", type=float, help="reject tokens issued longer ago (seconds)")
    em = sub.add_parser("emulator", help="run the Metering Service emulator")
    em.add_argument("--listen", default="127.0.0.1:8790")
    em.add_argument("--write-public-key", metavar="PATH", help="write the signing key's PEM here")
    em.add_argument(
        "--not-entitled",
        action="store_true",
        help="answer CustomerNotEntitledException to each pod's first call",
    )
    em.add_argument("--throttle-rps", type=float, help="token-bucket throttle, requests/s")
    em.add_argument("--region", help="only accept calls signed for this region")
    sub.add_parser(
        "doctor",
        help="check configuration, key, region, credentials, endpoint and clock; changes nothing",
    )
    dm = sub.add_parser("demo", help="emulator + sidecar together, no AWS account needed")
    dm.add_argument("--exit-after", type=float, help="stop after this many seconds")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "probe":
        from sidecar.server.probe import probe

        return probe(args.path, args.address, args.timeout)
    if args.command == "run":
        return _run()
    if args.command == "verify-token":
        return _verify_token(args.nonce, args.max_age)
    if args.command == "emulator":
        return _emulator(args)
    if args.command == "doctor":
        from sidecar.doctor import doctor

        return doctor(sys.stdout)
    if args.command == "demo":
        from sidecar.demo import demo

        return demo(args.exit_after)
    raise AssertionError(args.command)


def _load() -> tuple[Settings, dict[int, RSAPublicKey]] | None:
    from sidecar.config import ConfigError, load

    try:
        return load()
    except ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}", file=sys.stderr)
        return None


def _run() -> int:
    loaded = _load()
    if loaded is None:
        return 2
    from sidecar.app import run

    return run(*loaded)


def _verify_token(nonce: str | None, max_age: float | None) -> int:
    import json
    import time

    import jwt

    from sidecar.entitlement.verify import TokenError, verify_token

    loaded = _load()
    if loaded is None:
        return 2
    settings, keys = loaded
    token = sys.stdin.read(64 * 1024).strip()
    checked_nonce = nonce
    if checked_nonce is None:
        try:
            checked_nonce = str(jwt.decode(token, options={"verify_signature": False})["nonce"])
        except (jwt.PyJWTError, KeyError, TypeError):
            checked_nonce = ""
        print("warning: no --nonce given, the nonce was not checked", file=sys.stderr)
    try:
        claims = verify_token(
            token,
            keys,
            product_code=settings.product_code,
            public_key_version=settings.public_key_version,
            nonce=checked_nonce,
            now=time.time(),
            leeway=settings.clock_skew_seconds,
            max_age=max_age,
        )
    except TokenError as exc:
        print(f"invalid token ({exc.reason}): {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(claims, indent=2, sort_keys=True))
    return 0


def _emulator(args: argparse.Namespace) -> int:
    import signal
    import threading

    from sidecar.emulator.service import Emulator, EmulatorConfig, EmulatorServer
    from sidecar.server.netaddr import parse_hostport

    host, port = parse_hostport(args.listen)
    config = EmulatorConfig(
        entitled=not args.not_entitled, throttle_rps=args.throttle_rps, region=args.region
    )
    emulator = Emulator(config)
    if args.write_public_key:
        with open(args.write_public_key, "w") as f:
            f.write(emulator.public_pem())
    server = EmulatorServer(emulator, host, port)
    print(
        f"emulator listening on {server.url} "
        f"(export AWS_ENDPOINT_URL_MARKETPLACE_METERING={server.url})",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    while not stop.wait(1.0):
        pass
    server.shutdown()
    server.server_close()
    return 0
