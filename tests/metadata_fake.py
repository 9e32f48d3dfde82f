"""Loopback stand-ins for the AWS credential and metadata endpoints the sidecar and botocore
read, so no test touches 169.254.169.254, 169.254.170.2 or STS:

    POST /                                                 STS AssumeRoleWithWebIdentity (IRSA,
                                                           via AWS_ENDPOINT_URL_STS)
    PUT /latest/api/token                                  IMDSv2 session token
    GET /latest/meta-data/placement/region                 (token required)
    GET /latest/meta-data/iam/security-credentials/[role]  node-role credentials
    GET /v4/task                                           ECS task metadata v4
    GET /task-creds                                        container credentials (ECS task role)
"""

from __future__ import annotations

import json
import threading
import urllib.parse
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


IRSA_ACCESS_KEY = "ASIAIRSALOOPBACK"
STS_RESPONSE = """<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <Credentials>
      <AccessKeyId>{key}</AccessKeyId>
      <SecretAccessKey>irsa-secret</SecretAccessKey>
      <SessionToken>irsa-session-token</SessionToken>
      <Expiration>2099-01-01T00:00:00Z</Expiration>
    </Credentials>
    <SubjectFromWebIdentityToken>system:serviceaccount:shop:product</SubjectFromWebIdentityToken>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::111122223333:assumed-role/metering/s</Arn>
      <AssumedRoleId>AROAEXAMPLE:s</AssumedRoleId>
    </AssumedRoleUser>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>sts-1</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"""


class FakeMetadata:
    def __init__(self) -> None:
        self.task: dict[str, Any] = {}
        self.seen: list[tuple[str, str, str | None]] = []
        self.sts_calls: list[dict[str, list[str]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                fake.sts_calls.append(urllib.parse.parse_qs(body))
                self._reply(200, STS_RESPONSE.format(key=IRSA_ACCESS_KEY).encode())

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
