"""Loopback stand-ins for the AWS credential and metadata endpoints the sidecar and botocore
read, so no test touches 169.254.169.254, 169.254.170.2 or STS.

`MotoSts`: moto's real STS in server mode, for IRSA (AssumeRoleWithWebIdentity through
AWS_ENDPOINT_URL_STS). `FakeMetadata`, hand-written, for what moto does not serve:

    PUT /latest/api/token                                  IMDSv2 session token
    GET /latest/meta-data/placement/region                 (token required)
    GET /latest/meta-data/iam/security-credentials/[role]  node-role credentials
    GET /v4/task                                           ECS task metadata v4
    GET /task-creds                                        container credentials (ECS task role)
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = "imds-token"
REGION = "ap-southeast-2"
ROLE = "node-role"
CREDENTIALS = {
    "Code": "Success",
    "AccessKeyId": "ASIAMETADATA",
    "SecretAccessKey": "s",
    "Token": "t",
    "Expiration": "2099-01-01T00:00:00Z",
    "RoleArn": "arn:aws:iam::111122223333:role/x",
}


class FakeMetadata:
    def __init__(self) -> None:
        self.task: dict[str, Any] = {}
        self.seen: list[tuple[str, str, str | None]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                fake.seen.append(("PUT", self.path, ttl))
                self._reply(200, TOKEN.encode())

            def do_GET(self) -> None:
                token = self.headers.get("X-aws-ec2-metadata-token")
                fake.seen.append(("GET", self.path, token))
                path = self.path
                if path == "/v4/task":
                    return self._reply(200, json.dumps(fake.task).encode())
                if path == "/task-creds":
                    return self._reply(200, json.dumps(CREDENTIALS).encode())
                if path.startswith("/latest/") and token != TOKEN:
                    return self._reply(401, b"")
                if path == "/latest/meta-data/placement/region":
                    return self._reply(200, REGION.encode())
                if path == "/latest/meta-data/iam/security-credentials/":
                    return self._reply(200, ROLE.encode())
                if path == f"/latest/meta-data/iam/security-credentials/{ROLE}":
                    return self._reply(200, json.dumps(CREDENTIALS).encode())
                return self._reply(404, b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()


IRSA_ACCOUNT = "111122223333"


@dataclass(frozen=True)
class Assumed:
    role_arn: str
    session_name: str
    access_key_id: str


class MotoSts:
    """moto's STS in server mode on loopback: a maintained IRSA stand-in (it does not check the
    web identity token's signature, so any JWT-shaped file works)."""

    def __init__(self) -> None:
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self._before = len(self._roles())

    @staticmethod
    def _roles() -> list[Any]:
        from moto.sts.models import sts_backends

        roles: list[Any] = sts_backends[IRSA_ACCOUNT]["aws"].assumed_roles
        return roles

    @property
    def url(self) -> str:
        host, port = self._server.get_host_and_port()
        return f"http://{host}:{port}"

    def forget(self) -> None:
        """From now on `assumed()` lists only new roles: a server shared by several tests
        answers each as a fresh one would (moto's STS keeps no other state a test reads)."""
        self._before = len(self._roles())

    def assumed(self) -> list[Assumed]:
        """Roles assumed through this server since it started (moto keeps state per process)."""
        return [
            Assumed(r.role_arn, r.session_name, r.access_key_id)
            for r in self._roles()[self._before :]
        ]

    def close(self) -> None:
        self._server.stop()
