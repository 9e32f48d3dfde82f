"""A stand-in for the kube-apiserver paths the sidecar uses (nothing real can run here):

    GET   /api/v1/namespaces/{ns}/pods/{name}
    PATCH /api/v1/namespaces/{ns}/pods/{name}/status   (strategic-merge / merge patch of
                                                        status.conditions, merged by `type`)
    POST  /api/v1/namespaces/{ns}/events

Served over HTTPS on 127.0.0.1 with a self-signed certificate (IP SAN 127.0.0.1), so the
kubernetes client's real in-cluster configuration (token file, CA file, service host/port) is
exercised. `forbid` makes every PATCH and POST answer 403, as missing RBAC would. The directory
is laid out like the chart's projected volume: token, ca.crt, namespace and (see `project_uid`)
the pod's UID from the downward API.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import ssl
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

POD_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)(/status)?$")
EVENTS_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/events$")


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "ca.crt", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


class FakeApiServer:
    def __init__(self, directory: Path, token: str = "sa-token") -> None:
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.forbid = False
        self.token = token
        self.lock = threading.Lock()
        cert, key = self_signed(directory)
        (directory / "token").write_text(token)
        self.sa_dir = directory
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with fake.lock:
                    fake.requests.append(
                        {
                            "method": self.command,
                            "path": self.path,
                            "content_type": self.headers.get("Content-Type"),
                            "authorization": self.headers.get("Authorization"),
                            "body": json.loads(body) if body else None,
                        }
                    )
                events = EVENTS_PATH.match(self.path.split("?")[0])
                if events and self.command == "POST":
                    if fake.forbid:
                        return self._reply(403, {"kind": "Status", "code": 403})
                    with fake.lock:
                        fake.events.append(json.loads(body))
                    return self._reply(201, json.loads(body))
                match = POD_PATH.match(self.path.split("?")[0])
                auth = (self.headers.get("Authorization") or "").split(" ", 1)
                if auth[0].lower() != "bearer" or auth[-1] != fake.token:  # scheme: any case
                    return self._reply(401, {"kind": "Status", "code": 401})
                if not match:
                    return self._reply(404, {"kind": "Status", "code": 404})
                ns, name, status = match.groups()
                with fake.lock:
                    pod = fake.pods.get((ns, name))
                    if pod is None:
                        return self._reply(404, {"kind": "Status", "code": 404})
                    if self.command == "GET" and not status:
                        return self._reply(200, pod)
                    if self.command == "PATCH" and status:
                        if fake.forbid:
                            return self._reply(
                                403, {"kind": "Status", "code": 403, "reason": "Forbidden"}
                            )
                        patch = json.loads(body)
                        conditions = pod.setdefault("status", {}).setdefault("conditions", [])
                        for cond in patch.get("status", {}).get("conditions", []):
                            conditions[:] = [c for c in conditions if c["type"] != cond["type"]]
                            conditions.append(cond)
                        return self._reply(200, pod)
                return self._reply(405, {"kind": "Status", "code": 405})

            do_GET = do_PATCH = do_POST = _handle  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def add_pod(self, namespace: str, name: str) -> None:
        with self.lock:
            self.pods[(namespace, name)] = {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": self.uid(namespace, name),
                },
                "status": {"conditions": [{"type": "Ready", "status": "False"}]},
            }

    @staticmethod
    def uid(namespace: str, name: str) -> str:
        """A UUID like the apiserver's, stable per pod so tests can assert it."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"pod/{namespace}/{name}"))

    def project_uid(self, namespace: str, name: str) -> None:
        """Write the pod's UID where the chart's downward-API projection puts it."""
        (self.sa_dir / "namespace").write_text(namespace)
        (self.sa_dir / "pod-uid").write_text(self.uid(namespace, name))

    def condition(self, namespace: str, name: str, ctype: str) -> dict[str, Any] | None:
        with self.lock:
            for cond in self.pods[(namespace, name)]["status"]["conditions"]:
                if cond["type"] == ctype:
                    return dict(cond)
        return None

    def close(self) -> None:
        self.server.shutdown()
