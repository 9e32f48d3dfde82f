"""`marketplace-sidecar demo [--mode hourly|custom|saas|contract]`: the emulator and the sidecar
in one process, no AWS account.

The sidecar trusts the emulator's key only because the demo configures it explicitly (a file the
banner names), exactly as a seller configures the key from their AMMP product page.

custom and saas run on a fast clock: the sidecar's MARKETPLACE_TEST_ONLY_TIME_SCALE/ORIGIN and the
emulator's time_scale/time_origin agree, so an hour passes in HOUR_SECONDS real seconds; the
demo posts sample usage and prints what the emulator "billed" once the hour is sent. The clock
starts at the same minute of an hour in every run (START_MINUTE), so the wait for the bill does
not depend on the minute the demo was started.

The demo sets only what its mode reads: a newcomer's first run shows no warning.

contract grants a demo license in the emulator's License Manager and prints the pod's checkout.

saas also plays the buyer's lifecycle when moto's SQS server can start here (moto[server] is a
development dependency, installed by `make demo`; never a runtime one): a local queue is the
sidecar's MARKETPLACE_SAAS_EVENTS_QUEUE_URL, the emulator's events API puts a "Purchase Agreement
Ended" on it, and the demo prints the customer's subscription from GET /v1/customers/{id} before
and after. Without moto the demo says so and skips that step.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sidecar.emulator.service import Emulator, EmulatorConfig, EmulatorServer

MODES = ("hourly", "custom", "saas", "contract")
DEMO_SKU = "demo-product-id"
DEMO_ENTITLEMENTS = [{"name": "PremiumTier", "unit": "None"}, {"name": "Seats", "unit": "Count"}]
PRODUCT_CODE = "demo-product-code"
DIMENSIONS = ("scans", "users")
HOUR_SECONDS = 10.0  # the fast clock: one metering hour in ten real seconds
TIME_SCALE = 3600.0 / HOUR_SECONDS
BILLED_WITHIN = 60.0  # seconds: the records are printed by then, or the demo says why not
# The fast clock starts at this minute of an hour: late enough that the first hour ends soon,
# early enough (12 simulated minutes = 2 real seconds) that start-up and the sample usage land
# in it even on a loaded machine.
START_MINUTE = 48

DEMO_ENV = {
    "MARKETPLACE_PRODUCT_CODE": PRODUCT_CODE,
    "MARKETPLACE_LOG_FORMAT": "text",
    "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "demo-pod",
    "AWS_SECRET_ACCESS_KEY": "demo-secret",  # nosec B105 # the local emulator's dummy key
    "AWS_EC2_METADATA_DISABLED": "true",
    # The demo stays on this machine: the probe listener too (production binds all interfaces).
    "MARKETPLACE_PROBE_LISTEN": "127.0.0.1:8788",
}
LISTENERS = (
    ("MARKETPLACE_LISTEN", "127.0.0.1:8787"),
    ("MARKETPLACE_PROBE_LISTEN", DEMO_ENV["MARKETPLACE_PROBE_LISTEN"]),
)


def demo(exit_after: float | None = None, mode: str = "hourly") -> int:
    from sidecar.app import run
    from sidecar.config import ConfigError, load

    if mode not in MODES:
        print(f"demo: --mode must be one of {', '.join(MODES)}, got {mode!r}", file=sys.stderr)
        return 2
    for name, value in DEMO_ENV.items():
        if not (mode == "contract" and name == "MARKETPLACE_PRODUCT_CODE"):
            os.environ.setdefault(name, value)
    # Checked before anything starts or prints: a taken port must not follow a banner.
    taken = taken_ports(os.environ, mode)
    if taken:
        for line in taken:
            print(line, file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="marketplace-sidecar-demo-"))
    events: LifecycleQueue | None = None
    config = EmulatorConfig()
    emulator = Emulator(config)
    server = EmulatorServer(emulator).start()
    key_file = workdir / "demo-public-key.pem"
    os.environ["AWS_ENDPOINT_URL_MARKETPLACE_METERING"] = server.url
    os.environ.pop("MARKETPLACE_PUBLIC_KEY", None)
    os.environ.pop("MARKETPLACE_PUBLIC_KEY_FILE", None)
    if mode == "hourly":  # only hourly verifies a token: MeterUsage and SaaS calls return none
        key_file.write_text(emulator.public_pem())
        os.environ["MARKETPLACE_PUBLIC_KEY_FILE"] = str(key_file)
    elif mode == "contract":
        contract_env(emulator, server.url)
    if mode == "saas":
        events = lifecycle_queue(server.url)
    if mode in ("custom", "saas"):
        origin = fast_clock_origin(time.time())
        config.time_scale, config.time_origin = TIME_SCALE, origin
        os.environ["MARKETPLACE_MODE"] = mode
        os.environ.setdefault("MARKETPLACE_DIMENSIONS", ",".join(DIMENSIONS))
        os.environ["MARKETPLACE_STATE_DIR"] = str(workdir)
        os.environ["MARKETPLACE_TEST_ONLY_TIME_SCALE"] = repr(TIME_SCALE)
        os.environ["MARKETPLACE_TEST_ONLY_TIME_ORIGIN"] = repr(origin)
        # The banner announces the fast clock; the daemon's warning is for a run that did not
        # ask for it, so in the demo it is an info line.
        logging.getLogger("sidecar").addFilter(_FastClockIsAnnounced())
    try:
        try:
            settings, keys = load()
        except ConfigError as exc:
            for line in exc.problems:
                print(f"config error: {line}", file=sys.stderr)
            return 2
        api, probe = settings.listen, settings.probe_listen
        print(banner(mode, server.url, api, probe, key_file), flush=True)
        outcome: list[bool] = []
        if mode == "contract":
            threading.Thread(
                target=lambda: outcome.append(show_checkout(server.url, probe, api)),
                name="demo-license",
                daemon=True,
            ).start()
        elif mode != "hourly":
            dims = settings.dimension_list

            def usage_then_lifecycle() -> None:
                customer = show_billing(mode, emulator, api, probe, dims)
                ok = customer is not None
                if ok and mode == "saas" and isinstance(customer, dict):
                    ok = show_lifecycle(emulator, api, customer, events)
                outcome.append(ok)

            threading.Thread(target=usage_then_lifecycle, name="demo-usage", daemon=True).start()
        if exit_after is not None:
            import signal

            threading.Timer(exit_after, lambda: signal.raise_signal(signal.SIGTERM)).start()
        code = run(settings, keys)
        server.shutdown()
        return code if code or outcome != [False] else 1
    finally:
        if events is not None:
            events.close()
        shutil.rmtree(workdir, ignore_errors=True)


def contract_env(emulator: Emulator, url: str) -> None:
    """A demo license in the emulator's License Manager, and the settings that check it out."""
    from sidecar.emulator.license_manager import book

    license_book = book(emulator)
    with license_book.lock:
        license_book.grant({"sku": DEMO_SKU, "entitlements": [*DEMO_ENTITLEMENTS[:1], {
            "name": "Seats", "unit": "Count", "max": 10}]})  # fmt: skip
    os.environ["AWS_ENDPOINT_URL_LICENSE_MANAGER"] = url
    os.environ["MARKETPLACE_MODE"] = "contract"
    os.environ.setdefault("MARKETPLACE_LICENSE_PRODUCT_SKU", DEMO_SKU)
    os.environ.setdefault(
        "MARKETPLACE_LICENSE_ENTITLEMENTS",
        json.dumps([DEMO_ENTITLEMENTS[0], {**DEMO_ENTITLEMENTS[1], "value": 1}]),
    )


def show_checkout(emulator_url: str, probe: str, api: str) -> bool:
    """Print the pod's checkout once it is ready, and the pool it came from."""
    started = time.monotonic()
    if not _until(lambda: _http("GET", f"http://{probe}/readyz")[0] == 200, BILLED_WITHIN):
        print("demo: the sidecar did not check out a license; see its log above", flush=True)
        return False
    _, doc = _http("GET", f"http://{api}/v1/entitlement")
    shown = {k: doc.get(k) for k in ("state", "license_arn", "entitlements_allowed", "expiration")}
    print(
        f"demo: License Manager checkout (after {time.monotonic() - started:.1f} s): "
        f"{json.dumps(shown, sort_keys=True)}",
        flush=True,
    )
    _, pool = _http("GET", f"{emulator_url}/_emulator/license/state")
    print(f"demo: seats in use: {json.dumps(pool['licenses'][DEMO_SKU]['in_use'])}", flush=True)
    return True


def taken_ports(env: Mapping[str, str], mode: str = "hourly") -> list[str]:
    """One line per demo listener whose port another process holds, naming its variable, then
    a command that moves both ports to free ones and keeps the mode, runnable as printed."""
    from sidecar.server.netaddr import parse_hostport

    problems = []
    for variable, default in LISTENERS:
        value = env.get(variable) or default
        try:
            host, port = parse_hostport(value)
        except ValueError:
            continue  # the configuration check names it
        if _bindable(host, port) is False:
            problems.append(
                f"config error: {variable}={value}: port {port} is taken (another demo or sidecar?)"
            )
    if not problems:
        return []
    moved, seen = [], set()
    for variable, default in LISTENERS:
        host, port = "127.0.0.1", int(default.rsplit(":", 1)[1]) + 10000
        for _ in range(100):  # a free port now: the printed command works when pasted
            if port not in seen and _bindable(host, port):
                break
            port += 1
        seen.add(port)
        moved.append(f"{variable}={host}:{port}")
    problems.append(
        "  stop it, or move the demo's ports (MARKETPLACE_LISTEN: the API, "
        "MARKETPLACE_PROBE_LISTEN: the probe), e.g.:"
    )
    problems.append(f"  {' '.join(moved)} {command_line()} demo --mode {mode}")
    return problems


def _bindable(host: str, port: int) -> bool | None:
    """Whether `port` can be bound as the servers bind it; None for errors other than in use."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind((host, port))
        except OSError as exc:
            return False if exc.errno == errno.EADDRINUSE else None  # the daemon reports others
    return True


def fast_clock_origin(now: float) -> float:
    """The origin that puts the scaled clock (origin + (t - origin) * scale) at START_MINUTE of
    an hour at real time `now`, never behind the real clock."""
    hour = 3600.0
    target = now // hour * hour + START_MINUTE * 60
    if target < now:
        target += hour
    return (now * TIME_SCALE - target) / (TIME_SCALE - 1)


class _FastClockIsAnnounced(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "test_only_clock" and record.levelno == logging.WARNING:
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def command_line() -> str:
    """How to call this program from any shell: the bare name only if PATH finds this one."""
    script = Path(sys.executable).with_name("marketplace-sidecar")
    found = shutil.which("marketplace-sidecar")
    if found and script.exists() and Path(found).resolve() == script.resolve():
        return "marketplace-sidecar"
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m sidecar"


def banner(mode: str, emulator_url: str, api: str, probe: str, key_file: Path) -> str:
    cli = command_line()
    key = shlex.quote(str(key_file))
    lines = [
        "",
        f"Mode:              {mode}"
        + (
            ""
            if mode in ("hourly", "contract")
            else f" (fast clock: one hour every {HOUR_SECONDS:.0f} s)"
        ),
        f"Metering emulator: {emulator_url}   (calls: curl -s {emulator_url}/_emulator/calls)"
        if mode != "contract"
        else f"License Manager emulator: {emulator_url}",
        f"Demo public key:   {key_file}" if mode == "hourly" else "",
        f"Sidecar API:       http://{api}",
        f"  curl -s http://{api}/v1/entitlement",
        f"  curl -s http://{probe}/readyz",
        f"  {cli} probe --address {probe} && echo ready",
    ]
    if mode == "hourly":
        lines += [
            f'  curl -s -X POST http://{api}/v1/entitlement/challenge -d \'{{"nonce": "n1"}}\' \\',
            "    | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"token\"])' \\",
            f"    | MARKETPLACE_PUBLIC_KEY_FILE={key} MARKETPLACE_PRODUCT_CODE={PRODUCT_CODE} \\",
            f"      {cli} verify-token --nonce n1",
        ]
    elif mode == "contract":
        lines += [
            f"  curl -s {emulator_url}/_emulator/license/state",
            f"  curl -s -X POST {emulator_url}/_emulator/license/change "
            f'-d \'{{"sku": "{DEMO_SKU}", "revoke": true}}\'',
            "The demo prints the pod's checkout; Ctrl-C checks the seat back in.",
        ]
    elif mode == "custom":
        lines += [
            f'  curl -s -X POST http://{api}/v1/usage -d \'{{"dimension": "scans", '
            '"quantity": 3}\'',
            f"  curl -s http://{api}/v1/usage",
        ]
    else:
        lines += [
            f"  curl -s -X POST {emulator_url}/_emulator/saas/customers "
            f'-d \'{{"product_code": "{PRODUCT_CODE}"}}\'',
            f"  curl -s -X POST http://{api}/v1/customers/resolve "
            '-d \'{"registration_token": "…"}\'',
            f"  curl -s http://{api}/v1/usage",
        ]
    if mode in ("custom", "saas"):
        lines.append(
            "The demo posts sample usage now and prints what AWS billed once the hour is sent."
        )
    if mode == "saas" and os.environ.get("MARKETPLACE_SAAS_EVENTS_QUEUE_URL"):
        lines.append(
            "Then it ends the buyer's agreement (an event on a local SQS queue) and prints "
            "GET /v1/customers/{id}."
        )
    lines += ["Ctrl-C to stop.", ""]
    return "\n".join(line for i, line in enumerate(lines) if line or i in (0, len(lines) - 1))


def _http(method: str, url: str, doc: Any | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = None if doc is None else json.dumps(doc).encode()
    req = urllib.request.Request(url, data=data, method=method)  # loopback only
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # nosec B310 # loopback
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"null")
        except ValueError:
            return exc.code, body.decode("utf-8", "replace")


def _until(check: Callable[[], Any], timeout: float, step: float = 0.2) -> Any:
    """The first truthy result of `check` within `timeout` seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except OSError:
            got = None
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(step)


def show_billing(
    mode: str, emulator: Emulator, api: str, probe: str, dimensions: tuple[str, ...]
) -> dict[str, Any] | None:
    """Post sample usage like a product would, then print what the emulator billed. Returns the
    resolved customer (saas; {} in custom mode), or None when a step failed (printed)."""
    started = time.monotonic()
    if not _until(lambda: _http("GET", f"http://{probe}/readyz")[0] == 200, BILLED_WITHIN):
        print("demo: the sidecar did not become ready; see its log above", flush=True)
        return None
    records: list[dict[str, Any]] = []
    resolved: Any = {}
    if mode == "custom":
        records = [{"dimension": dimensions[0], "quantity": 3}]
    else:
        customer = emulator.saas_customer({"product_code": PRODUCT_CODE})
        status, resolved = _http(
            "POST",
            f"http://{api}/v1/customers/resolve",
            {"registration_token": customer["registration_token"]},
        )
        if status != 200:
            print(f"demo: resolve answered {status}: {resolved}", flush=True)
            return None
        print(f"demo: resolved customer {json.dumps(resolved, sort_keys=True)}", flush=True)
        keys = ("customer_aws_account_id", "license_arn")
        who: dict[str, Any] = {k: resolved[k] for k in keys if k in resolved}
        records = [
            {**who, "dimension": dimensions[0], "quantity": 3, "id": "demo-1"},
            {**who, "dimension": dimensions[-1], "quantity": 2, "id": "demo-2"},
        ]
    body: Any = records[0] if mode == "custom" else records
    status, answer = _http("POST", f"http://{api}/v1/usage", body)
    print(f"demo: POST /v1/usage {json.dumps(body)} -> {status}", flush=True)
    if status not in (200, 202):
        print(f"demo: the usage was refused: {answer}", flush=True)
        return None
    wanted = {(r["dimension"], r["quantity"]) for r in records}

    def billed() -> list[dict[str, Any]]:
        ledger = emulator.ledger() if mode == "custom" else emulator.saas_ledger()
        found = [r for r in ledger["records"] if (r["dimension"], r["quantity"]) in wanted]
        return found if {(r["dimension"], r["quantity"]) for r in found} == wanted else []

    found = _until(billed, max(1.0, BILLED_WITHIN - (time.monotonic() - started)))
    if not found:
        print(f"demo: nothing billed within {BILLED_WITHIN:.0f} s; see the log above", flush=True)
        return None
    operation = "MeterUsage" if mode == "custom" else "BatchMeterUsage"
    print(f"demo: AWS billed ({operation}, after {time.monotonic() - started:.1f} s):", flush=True)
    for record in found:
        print(f"  {json.dumps(record, sort_keys=True)}", flush=True)
    return dict(resolved) if mode == "saas" else {}


class LifecycleQueue:
    """moto's SQS server on a free loopback port and one queue on it: the demo's stand-in for the
    queue AWS Marketplace's EventBridge rule delivers to."""

    def __init__(self, server: Any, url: str) -> None:
        self._server = server
        self.url = url

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._server.stop()


def lifecycle_queue(emulator_url: str) -> LifecycleQueue | None:
    """Start moto's SQS server and a queue, and point the sidecar at them (its events queue, and
    GetEntitlements at the emulator); None, said in one line, when moto is not installed."""
    try:
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    except ImportError:
        print(
            "demo: the SaaS lifecycle step needs moto's SQS server (a development dependency: "
            "make demo installs it, or pip install 'moto[server]'); skipped",
            flush=True,
        )
        return None
    import botocore.session

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request lines
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client: Any = botocore.session.get_session().create_client(
        "sqs", region_name="us-east-1", endpoint_url=endpoint
    )
    try:
        url = str(client.create_queue(QueueName="marketplace-saas-events")["QueueUrl"])
    finally:
        client.close()
    os.environ["MARKETPLACE_SAAS_EVENTS_QUEUE_URL"] = url
    os.environ["AWS_ENDPOINT_URL_SQS"] = endpoint
    os.environ["AWS_ENDPOINT_URL_MARKETPLACE_ENTITLEMENT_SERVICE"] = emulator_url
    return LifecycleQueue(server, url)


def show_lifecycle(
    emulator: Emulator, api: str, customer: dict[str, Any], events: LifecycleQueue | None
) -> bool:
    """Put a "Purchase Agreement Ended" for the demo's buyer on the queue (the emulator's events
    API) and print its subscription in GET /v1/customers/{id} before and after."""
    if events is None:
        return True  # said at start-up
    account = str(customer.get("customer_aws_account_id") or "")
    path = f"http://{api}/v1/customers/{account}"
    _, before = _http("GET", path)
    started = time.monotonic()
    # Dated by the real clock: SQS's SentTimestamp is real time, and the sidecar refuses events
    # dated more than 15 minutes after it (the fast clock runs hours ahead).
    emulator.saas_event(
        {
            "type": "purchase-agreement-ended",
            "product_code": PRODUCT_CODE,
            "customer_aws_account_id": account,
            "queue_url": events.url,
            "time": time.time(),
        }
    )

    def changed() -> dict[str, Any] | None:
        status, doc = _http("GET", path)
        if status == 200 and isinstance(doc, dict) and doc.get("subscription") != "subscribed":
            return doc
        return None

    after = _until(changed, BILLED_WITHIN)
    was = before.get("subscription") if isinstance(before, dict) else before
    if not after:
        print(f"demo: the lifecycle event did not reach GET /v1/customers/{account}", flush=True)
        return False
    life = after.get("lifecycle") or {}
    print(
        f"demo: SaaS lifecycle: Purchase Agreement Ended sent to the queue; GET "
        f"/v1/customers/{account}: subscription {was} -> {after['subscription']} "
        f"(after {time.monotonic() - started:.1f} s; last_event {life.get('last_event')!r})",
        flush=True,
    )
    return True
