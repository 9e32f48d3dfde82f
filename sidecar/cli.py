"""Command line. Each command imports only what it needs: `probe` must stay fast.

`run` catches SIGTERM/SIGINT before anything else is imported: a pod deleted while the
sidecar starts must still exit 0 (it would otherwise die by the signal during the imports).
"""

from __future__ import annotations

import sys

# Not `from typing import TYPE_CHECKING`: importing typing costs ~10 ms before `run` has its
# signal handler. mypy treats any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    from sidecar.config import Settings

OTHER_VARIABLES = """\
  AWS_REGION, AWS_DEFAULT_REGION
      the region; else ECS task metadata v4, else IMDSv2
  AWS_ENDPOINT_URL_MARKETPLACE_METERING
      botocore's endpoint override (the emulator, a VPC endpoint)
  AWS credentials
      the standard chain: the ECS task role, or IRSA on EKS
      (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE)"""


class EarlyStop:
    """SIGTERM/SIGINT caught from the first instant of `run`, before the imports; `run`
    honours it once it has its own handler. Plain attribute: no threading import yet."""

    requested = False

    def __call__(self, *_: object) -> None:
        self.requested = True


def _catch_stop_signals() -> EarlyStop:
    import signal

    early = EarlyStop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, early)
        except ValueError:  # not the main thread: whoever embeds us owns the signals
            break
    return early


def _configuration_help() -> str:
    """Built only when help is printed: `probe` must stay light."""
    from sidecar.config import variables_help

    return (
        "configuration: environment variables. A bad value, or a MARKETPLACE_* variable\n"
        "this sidecar does not know (a misspelling), stops it before any port is bound\n"
        "with exit code 2 and one line per problem.\n\n"
        f"{variables_help()}\n\nother variables:\n{OTHER_VARIABLES}"
    )


def _parser() -> argparse.ArgumentParser:
    import argparse

    from sidecar import __version__

    class Parser(argparse.ArgumentParser):
        """An ArgumentParser whose epilog is computed when help is shown, not at start."""

        lazy_epilog: Callable[[], str] | None = None

        def format_help(self) -> str:
            if self.lazy_epilog is not None:
                self.epilog = self.lazy_epilog()
            return super().format_help()

    def add(name: str, help: str, epilog: Callable[[], str] | None = None) -> Parser:
        sp: Parser = sub.add_parser(
            name, help=help, description=help, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sp.lazy_epilog = epilog
        return sp

    p = Parser(
        prog="marketplace-sidecar",
        description="AWS Marketplace metering sidecar: verifies the product's entitlement "
        "(RegisterUsage, or MeterUsage in custom mode), meters custom dimensions exactly once "
        "per hour, resolves SaaS customers and meters their usage (ResolveCustomer, "
        "BatchMeterUsage in saas mode), and serves all of it on a local API.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"marketplace-sidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add("run", "run the sidecar daemon (SIGTERM/SIGINT: exit 0)", _configuration_help)
    pr = add("probe", "exit 0 iff the sidecar is ready (for health checks)")
    pr.add_argument(
        "--path", default="/readyz", choices=["/readyz", "/healthz"], help="default: /readyz"
    )
    pr.add_argument("--address", help="host:port (default: MARKETPLACE_PROBE_LISTEN)")
    pr.add_argument("--timeout", type=float, default=2.0, help="seconds (default: 2)")
    vt = add(
        "verify-token",
        "verify a RegisterUsage token read from stdin with the configured key",
        _configuration_help,
    )
    vt.add_argument("--nonce", help="the nonce that was sent (strongly recommended)")
    vt.add_argument("--max-age", type=float, help="reject tokens issued longer ago (seconds)")
    em = add("emulator", "run the Metering Service emulator")
    em.add_argument("--listen", default="127.0.0.1:8790", help="host:port (default: %(default)s)")
    em.add_argument("--write-public-key", metavar="PATH", help="write the signing key's PEM here")
    em.add_argument(
        "--not-entitled",
        action="store_true",
        help="answer CustomerNotEntitledException to each pod's first call",
    )
    em.add_argument("--throttle-rps", type=float, help="token-bucket throttle, requests/s")
    em.add_argument("--region", help="only accept calls signed for this region")
    add(
        "doctor",
        "check configuration, key, region, credentials, endpoint and clock; changes nothing",
        _configuration_help,
    )
    dm = add("demo", "emulator + sidecar together, no AWS account needed")
    dm.add_argument(
        "--mode",
        default="hourly",
        choices=["hourly", "custom", "saas", "contract"],
        help="hourly (RegisterUsage), custom (MeterUsage), saas (ResolveCustomer + "
        "BatchMeterUsage) or contract (License Manager CheckoutLicense); custom and saas post "
        "sample usage on a fast clock and print what AWS billed, contract prints the checkout "
        "(default: %(default)s)",
    )
    dm.add_argument("--exit-after", type=float, help="stop after this many seconds")

    def top_epilog() -> str:
        usages = "\n".join(
            "  " + c.format_usage().removeprefix("usage: ").strip() for c in sub.choices.values()
        )
        return f"commands and their options:\n{usages}\n\n{_configuration_help()}"

    p.lazy_epilog = top_epilog
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    stop = _catch_stop_signals() if args_list[:1] == ["run"] else None
    args = _parser().parse_args(args_list)
    if args.command == "probe":
        from sidecar.server.probe import probe

        return probe(args.path, args.address, args.timeout)
    if args.command == "run":
        return _run(stop if stop is not None else _catch_stop_signals())
    if args.command == "verify-token":
        return _verify_token(args.nonce, args.max_age)
    if args.command == "emulator":
        return _emulator(args)
    if args.command == "doctor":
        from sidecar.doctor import doctor

        return doctor(sys.stdout)
    if args.command == "demo":
        from sidecar.demo import demo

        return demo(args.exit_after, args.mode)
    raise AssertionError(args.command)


def _load() -> tuple[Settings, dict[int, RSAPublicKey]] | None:
    from sidecar.config import ConfigError, load

    try:
        return load()
    except ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}", file=sys.stderr)
        return None


def _run(early: EarlyStop) -> int:
    from sidecar.config_child import start

    check = start()  # a child validates: this process never imports pydantic
    try:
        # Imported while the child validates (two cores at start): needed anyway.
        from sidecar.app import run
        from sidecar.config import ConfigError, complete

        if check.pid is not None:
            _prefetch()
        try:
            settings = check.result()
            keys = complete(settings)
        except ConfigError as exc:
            if early.requested and check.stopped:  # the group's stop ended the child too
                return 0
            for line in exc.problems:
                print(f"config error: {line}", file=sys.stderr)
            return 2
    finally:
        check.close()
    if early.requested:  # stopped while starting: bind nothing, call nobody
        return 0
    return run(settings, keys, stop_requested=lambda: early.requested)


def _prefetch() -> None:
    """botocore, which the first AWS call imports (every mode makes one), imported while
    the child validates: on two cores the imports overlap instead of adding up."""
    import botocore.config
    import botocore.exceptions
    import botocore.session  # noqa: F401


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
            product_code=settings.product_code or "",  # required in hourly mode
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
    from sidecar.emulator.service import Emulator, EmulatorConfig, EmulatorServer
    from sidecar.server.netaddr import parse_hostport
    from sidecar.stopsignals import StopSignals

    host, port = parse_hostport(args.listen)
    config = EmulatorConfig(
        entitled=not args.not_entitled, throttle_rps=args.throttle_rps, region=args.region
    )
    emulator = Emulator(config)
    if args.write_public_key:
        with open(args.write_public_key, "w") as f:
            f.write(emulator.public_pem())
    server = EmulatorServer(emulator, host, port)
    # Installed before the line below: whoever waits for it may signal at once.
    stop = StopSignals.install()  # takes no lock in the handler: see sidecar/stopsignals.py
    print(
        f"emulator listening on {server.url} "
        f"(export AWS_ENDPOINT_URL_MARKETPLACE_METERING={server.url})",
        flush=True,
    )
    server.start()
    while not stop.wait(1.0):
        pass
    stop.close()
    server.shutdown()
    server.server_close()
    return 0
