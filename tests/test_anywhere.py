"""The anywhere identity (sidecar.aws.anywhere): credentials from a License Manager license token.

Real servers on loopback: moto's STS in server mode (AssumeRoleWithWebIdentity, and
GetCallerIdentity signed with the credentials obtained), and a small License Manager stand-in
(GetAccessToken) that records what it was sent and can refuse, throttle, answer late or never.
Time is an injected clock: expiry and refresh windows are crossed without sleeping.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sidecar.aws.anywhere import (
    FILE_LIMIT,
    TOKEN_MAX,
    AnywhereIdentityUnavailableError,
    LicenseTokenFileError,
    LicenseTokenRejectedError,
    RoleNotAssumableError,
    license_session,
    session_name,
)
from tests.metadata_fake import MotoSts

ROLE = "arn:aws:iam::111122223333:role/AWSLicenseManagerConsumptionRole"
REGION = "us-east-1"
HANG = 15  # an exchange still running after this many seconds is hanging


def license_token() -> str:
    """JWT-shaped, unique per test, so a leak of it cannot be a coincidence."""
    return (
        f"eyJhbGciOiJSUzUxMiJ9.eyJsaWNlbnNlIjoi{secrets.token_hex(24)}.c2ln{secrets.token_hex(16)}"
    )


@dataclass
class Seen:
    token: str
    signed: bool


@dataclass
class LicenseManagerStandIn:
    """GetAccessToken over AWS's JSON protocol. `mode`: ok, reject, throttle, hang, late."""

    mode: str = "ok"
    delay: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    closing: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        lm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("x-amzn-RequestId", "lm-" + secrets.token_hex(4))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.headers["X-Amz-Target"] == "AWSLicenseManager.GetAccessToken"
                lm.seen.append(Seen(body["Token"], "Authorization" in self.headers))
                if lm.mode == "hang":
                    lm.closing.wait(60)
                    return None
                if lm.mode == "late":
                    time.sleep(lm.delay)
                if lm.mode == "reject":  # echoes the token, as a careless service might
                    return self._reply(
                        400,
                        {
                            "__type": "AuthorizationException",
                            "message": f"token {body['Token']} is expired or revoked",
                        },
                    )
                if lm.mode == "throttle":
                    return self._reply(
                        400, {"__type": "RateLimitExceededException", "message": "slow down"}
                    )
                access = f"eyJhY2Nlc3MiOiJ0b2tlbiJ9.{secrets.token_hex(32)}.sig"
                lm.issued.append(access)
                return self._reply(200, {"AccessToken": access})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


class RefusingSts:
    """An STS that refuses every AssumeRoleWithWebIdentity as AWS does when the role's trust
    policy does not match (moto's STS never refuses). Its message echoes the web identity."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        sts = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                from urllib.parse import parse_qs

                form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                identity = form["WebIdentityToken"][0]
                sts.seen.append(identity)
                body = (
                    '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
                    "<Type>Sender</Type><Code>AccessDenied</Code><Message>Not authorized to "
                    f"perform sts:AssumeRoleWithWebIdentity with {identity}</Message></Error>"
                    "<RequestId>sts-1</RequestId></ErrorResponse>"
                ).encode()
                self.send_response(403)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeClock:
    """Wall time that moves only when the test says so (starts at the real time, since STS's
    expiries are real)."""

    def __init__(self) -> None:
        self.t = time.time()

    def time(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        self.t += seconds
        return stop.is_set()

    def settle(self) -> None:
        """Back to STS's own now. STS stamps expiries by its (real) clock, so right after a
        refresh the node's clock reads what STS's read, as a synced node's would."""
        self.t = time.time()


class SecretVolume:
    """A Kubernetes Secret volume as the kubelet writes it: `license_token -> ..data/
    license_token`, `..data -> ..<timestamp>`; an update swaps `..data` atomically."""

    def __init__(self, root: Path, token: str) -> None:
        self.root = root
        self.versions = 0
        self.update(token)
        (root / "license_token").symlink_to("..data/license_token")

    @property
    def path(self) -> Path:
        return self.root / "license_token"

    def update(self, token: str) -> None:
        self.versions += 1
        version = self.root / f"..2026_12_07_{self.versions:02d}"
        version.mkdir()
        (version / "license_token").write_text(token + "\n")
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")


@pytest.fixture
def lm() -> Iterator[LicenseManagerStandIn]:
    server = LicenseManagerStandIn()
    yield server
    server.close()


@pytest.fixture
def endpoints(monkeypatch: pytest.MonkeyPatch, sts: MotoSts, lm: LicenseManagerStandIn) -> None:
    """botocore reads these per client: no test can reach AWS, and no AWS credentials exist."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_LICENSE_MANAGER", lm.url)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def caller_arn(session: Any) -> str:
    """GetCallerIdentity signed with the session's credentials: moto answers with the assumed
    role of the access key used, so this proves which credentials signed the call."""
    arn: str = session.client("sts").get_caller_identity()["Arn"]
    return arn


def expiry_of(session: Any) -> float:
    return float(session.get_credentials()._expiry_time.timestamp())


def frozen_of(session: Any) -> Any:
    return session.get_credentials().get_frozen_credentials()


def key_of(session: Any) -> str:
    key: str = session.get_credentials().get_frozen_credentials().access_key
    return key


def test_a_license_token_and_a_role_become_credentials_that_sign_calls(
    endpoints: None, tmp_path: Path, sts: MotoSts, lm: LicenseManagerStandIn
) -> None:
    token = license_token()
    volume = SecretVolume(tmp_path, token)
    session = license_session(volume.path, ROLE, REGION, role_session_name="pod-a")
    assert lm.seen == [], "nothing is read or called until credentials are needed"

    arn = caller_arn(session)

    assert arn == "arn:aws:sts::111122223333:assumed-role/AWSLicenseManagerConsumptionRole/pod-a"
    assert lm.seen == [Seen(token, signed=False)], "GetAccessToken goes unsigned, as AWS's guide"
    [assumed] = sts.assumed()
    assert (assumed.role_arn, assumed.session_name) == (ROLE, "pod-a")
    assert assumed.access_key_id == key_of(session)


def test_the_session_name_is_stable_identifying_and_valid_for_sts() -> None:
    import re

    assert session_name("shop-7d9f-abcde") == "marketplace-sidecar-shop-7d9f-abcde"
    assert session_name("shop-7d9f-abcde") == session_name("shop-7d9f-abcde")
    for host in ("", "a b/c:d", "x" * 200, "é-pod"):
        name = session_name(host)
        assert re.fullmatch(r"[\w+=,.@-]{2,64}", name, re.ASCII), name


def test_a_rotated_token_is_read_at_the_next_refresh_and_not_before(
    endpoints: None, tmp_path: Path, sts: MotoSts, lm: LicenseManagerStandIn
) -> None:
    clock = FakeClock()
    first, second = license_token(), license_token()
    volume = SecretVolume(tmp_path, first)
    session = license_session(volume.path, ROLE, REGION, clock=clock)
    caller_arn(session)
    key_before = key_of(session)

    volume.update(second)  # the buyer rotated the Secret; the kubelet swapped ..data
    clock.t += 30 * 60  # credentials (1 h) still 30 min from expiry: no refresh yet
    caller_arn(session)
    assert [s.token for s in lm.seen] == [first]
    assert key_of(session) == key_before

    clock.t += 16 * 60  # 14 min left: inside botocore's 15-minute advisory window
    caller_arn(session)
    assert [s.token for s in lm.seen] == [first, second]
    clock.settle()
    assert key_of(session) != key_before
    assert sts.assumed()[-1].access_key_id == key_of(session)


def test_credentials_are_refreshed_before_they_lapse_and_a_failed_refresh_is_bounded(
    endpoints: None, tmp_path: Path, sts: MotoSts, lm: LicenseManagerStandIn
) -> None:
    """Advisory window (15 min left): a refresh that fails keeps the still-valid credentials.
    Mandatory window (10 min left): the failure reaches the caller, named and retryable, and the
    stand-in's silence costs a bounded wait, not a hung sidecar."""
    clock = FakeClock()
    volume = SecretVolume(tmp_path, license_token())
    session = license_session(volume.path, ROLE, REGION, clock=clock, timeout=0.5)
    caller_arn(session)
    key = key_of(session)
    expiry = expiry_of(session)

    clock.t = expiry - 16 * 60
    caller_arn(session)
    assert len(lm.seen) == 1 and key_of(session) == key

    lm.mode = "hang"
    clock.t = expiry - 12 * 60  # advisory: tried, failed, old credentials still sign
    start = time.monotonic()
    assert caller_arn(session).endswith("/" + session_name())
    assert key_of(session) == key
    assert len(lm.seen) >= 2

    clock.t = expiry - 9 * 60  # mandatory: the caller hears of it
    with pytest.raises(AnywhereIdentityUnavailableError) as caught:
        caller_arn(session)
    assert time.monotonic() - start < HANG
    assert caught.value.info.retryable and caught.value.info.kind == "transient"
    assert "GetAccessToken" in str(caught.value)

    lm.mode = "ok"  # License Manager back: the next call refreshes and signs with new keys
    caller_arn(session)
    clock.settle()
    assert key_of(session) != key
    assert expiry_of(session) > expiry


def test_a_late_get_access_token_answer_inside_the_timeout_is_used(
    endpoints: None, tmp_path: Path, lm: LicenseManagerStandIn
) -> None:
    lm.mode, lm.delay = "late", 0.3
    session = license_session(SecretVolume(tmp_path, license_token()).path, ROLE, REGION)
    assert ":assumed-role/" in caller_arn(session)
    assert len(lm.seen) == 1


def test_get_access_token_never_answering_is_a_bounded_retryable_error(
    endpoints: None, tmp_path: Path, lm: LicenseManagerStandIn
) -> None:
    lm.mode = "hang"
    session = license_session(
        SecretVolume(tmp_path, license_token()).path, ROLE, REGION, timeout=0.5
    )
    start = time.monotonic()
    with pytest.raises(AnywhereIdentityUnavailableError) as caught:
        caller_arn(session)
    elapsed = time.monotonic() - start
    assert elapsed < HANG, elapsed
    assert len(lm.seen) == 2, "two attempts, each bounded by the timeout"
    assert "ReadTimeoutError" in str(caught.value)


def test_throttling_is_retryable_not_a_rejected_token(
    endpoints: None, tmp_path: Path, lm: LicenseManagerStandIn
) -> None:
    lm.mode = "throttle"
    session = license_session(SecretVolume(tmp_path, license_token()).path, ROLE, REGION)
    with pytest.raises(AnywhereIdentityUnavailableError, match="RateLimitExceededException"):
        caller_arn(session)


def test_a_revoked_token_is_named_as_rejected(
    endpoints: None, tmp_path: Path, lm: LicenseManagerStandIn, sts: MotoSts
) -> None:
    lm.mode = "reject"
    token = license_token()
    session = license_session(SecretVolume(tmp_path, token).path, ROLE, REGION)
    with pytest.raises(LicenseTokenRejectedError) as caught:
        caller_arn(session)
    info = caught.value.info
    assert (info.kind, info.retryable) == ("configuration", True)  # a new Secret heals it
    assert "License Manager refused the license token" in info.message
    assert "AuthorizationException" in info.message
    assert "CreateToken" in info.hint
    assert token not in str(caught.value) and token not in repr(caught.value)
    assert sts.assumed() == []


def test_sts_refusing_the_role_is_named_with_the_trust_policy_to_fix(
    monkeypatch: pytest.MonkeyPatch, endpoints: None, tmp_path: Path, lm: LicenseManagerStandIn
) -> None:
    refusing = RefusingSts()
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", refusing.url)
    try:
        session = license_session(SecretVolume(tmp_path, license_token()).path, ROLE, REGION)
        with pytest.raises(RoleNotAssumableError) as caught:
            session.client("license-manager").list_received_licenses()
    finally:
        refusing.close()
    info = caught.value.info
    assert ROLE in info.message and "AccessDenied" in info.message
    assert "openid-license-manager.amazonaws.com" in info.hint
    assert (info.kind, info.retryable) == ("configuration", True)
    assert refusing.seen == lm.issued, "STS got the access token License Manager issued"
    assert lm.issued[0] not in str(caught.value)


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def fifo(path: Path) -> None:
    os.mkfifo(path)


def fifo_behind_a_symlink(path: Path) -> None:
    """A Secret volume's layout (the key a symlink), its target swapped for a FIFO."""
    os.mkfifo(path.with_name("..data_fifo"))
    path.symlink_to("..data_fifo")


def dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def huge(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(100 * 1024 * 1024)


HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing": (lambda p: None, "does not exist"),
    "empty": (lambda p: p.touch(), "is empty"),
    "blank": (lambda p: write(p, b" \n\t\n"), "is empty"),
    "directory": (lambda p: p.mkdir(), "is a directory, not a regular file"),
    "fifo": (fifo, "is a FIFO (named pipe), not a regular file"),
    "fifo_behind_a_symlink": (fifo_behind_a_symlink, "is a FIFO (named pipe), not a regular file"),
    "dev_zero_symlink": (dev_zero, "is a character device, not a regular file"),
    "huge": (huge, f"is 104857600 bytes; at most {FILE_LIMIT}"),
    "two_lines": (lambda p: write(p, b"eyJhbGc.one\neyJhbGc.two\n"), "is not a license token"),
    "too_long": (lambda p: write(p, b"e" * (TOKEN_MAX + 1)), "is not a license token"),
    "binary": (lambda p: write(p, b"\xff\xfe\x00token"), "is not UTF-8 text"),
}


@pytest.mark.parametrize("shape", sorted(HOSTILE))
def test_a_hostile_token_file_is_refused_with_a_sentence_without_hanging(
    shape: str, endpoints: None, tmp_path: Path, lm: LicenseManagerStandIn
) -> None:
    make, expected = HOSTILE[shape]
    path = tmp_path / "license_token"
    make(path)
    session = license_session(path, ROLE, REGION)
    result: list[BaseException] = []

    def call() -> None:
        try:
            caller_arn(session)
        except BaseException as exc:
            result.append(exc)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(HANG)
    assert not worker.is_alive(), f"reading a {shape} token file hangs"
    [error] = result
    assert isinstance(error, LicenseTokenFileError), repr(error)
    assert f"license token file {path} {expected}" in error.info.message
    assert error.info.kind == "configuration" and error.info.retryable
    assert lm.seen == [], "nothing is sent for a file that is not a token"


def test_no_token_or_secret_reaches_a_log_or_an_exception_even_at_debug(
    monkeypatch: pytest.MonkeyPatch,
    endpoints: None,
    tmp_path: Path,
    lm: LicenseManagerStandIn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """botocore logs request and response bodies at DEBUG: the license token (GetAccessToken's
    body), the access token (its answer, and AssumeRoleWithWebIdentity's body), the role's
    secret key and session token (STS's answer; the session token in every signed request).
    Through a fetch, a refresh, a signed call, a refusal that echoes the token, and an STS
    refusal that echoes the access token, none of them is ever written."""
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    token = license_token()
    volume = SecretVolume(tmp_path, token)
    session = license_session(volume.path, ROLE, REGION, clock=clock)
    caller_arn(session)
    frozen = [frozen_of(session)]
    rotated = license_token()
    volume.update(rotated)
    clock.t += 50 * 60
    caller_arn(session)
    clock.settle()
    frozen.append(frozen_of(session))

    errors: list[BaseException] = []
    lm.mode = "reject"
    rejected = license_session(volume.path, ROLE, REGION)
    with pytest.raises(LicenseTokenRejectedError) as caught:
        caller_arn(rejected)
    errors.append(caught.value)
    lm.mode = "ok"
    refusing = RefusingSts()
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", refusing.url)
    try:
        with pytest.raises(RoleNotAssumableError) as refused:
            caller_arn(license_session(volume.path, ROLE, REGION))
        errors.append(refused.value)
    finally:
        refusing.close()

    secret_values: list[str] = [token, rotated, *lm.issued]
    secret_values += [c.secret_key for c in frozen] + [c.token for c in frozen]
    assert len(lm.issued) == 3 and all(secret_values)
    text = caplog.text + "".join(
        str(r.exc_info[1]) for r in caplog.records if r.exc_info and r.exc_info[1]
    )
    texts = [text] + [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [json.dumps(e.info.to_json()) for e in errors if hasattr(e, "info")]
    for i, secret in enumerate(secret_values):
        leaks = [
            t[max(0, t.find(secret) - 300) : t.find(secret) + 20] for t in texts if secret in t
        ]
        assert leaks == [], f"secret {i} leaked"
    # The test would see a leak: botocore did log the bodies, with the secrets taken out.
    loggers = {r.name for r in caplog.records}
    assert {"botocore.endpoint", "botocore.parsers"} <= loggers
    assert "[redacted]" in caplog.text
    assert any(e.__cause__ is None and e.__suppress_context__ for e in errors)
