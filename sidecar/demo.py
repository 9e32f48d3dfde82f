"""`marketplace-sidecar demo`: the emulator and the sidecar in one process, no AWS account.

The sidecar trusts the emulator's key only because the demo configures it explicitly, exactly as
a seller configures the key from their AMMP product page.
"""

from __future__ import annotations

import os
import threading

from sidecar.emulator.service import Emulator, EmulatorServer

DEMO_ENV = {
    "MARKETPLACE_PRODUCT_CODE": "demo-product-code",
    "MARKETPLACE_LOG_FORMAT": "text",
    "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "demo-pod",
    "AWS_SECRET_ACCESS_KEY": "demo-secret",  # nosec B105 # the local emulator's dummy key
    "AWS_EC2_METADATA_DISABLED": "true",
    # The demo stays on this machine: the probe listener too (production binds all interfaces).
    "MARKETPLACE_PROBE_LISTEN": "127.0.0.1:8788",
}


def demo(exit_after: float | None = None) -> int:
    from sidecar.app import run
    from sidecar.config import ConfigError, load

    emulator = Emulator()
    server = EmulatorServer(emulator).start()
    for name, value in DEMO_ENV.items():
        os.environ.setdefault(name, value)
    os.environ["AWS_ENDPOINT_URL_MARKETPLACE_METERING"] = server.url
    os.environ["MARKETPLACE_PUBLIC_KEY"] = emulator.public_pem()
    os.environ.pop("MARKETPLACE_PUBLIC_KEY_FILE", None)
    try:
        settings, keys = load()
    except ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}")
        return 2
    api = settings.listen
    probe = settings.probe_listen
    print(
        f"""
Metering emulator: {server.url}   (calls: curl -s {server.url}/_emulator/calls)
Sidecar API:       http://{api}
  curl -s http://{api}/v1/entitlement
  curl -s http://{probe}/readyz
  curl -s -X POST http://{api}/v1/entitlement/challenge -d '{{"nonce": "my-own-nonce"}}'
  marketplace-sidecar probe && echo ready
Ctrl-C to stop.
""",
        flush=True,
    )
    if exit_after is not None:
        import signal

        threading.Timer(exit_after, lambda: signal.raise_signal(signal.SIGTERM)).start()
    code = run(settings, keys)
    server.shutdown()
    return code
