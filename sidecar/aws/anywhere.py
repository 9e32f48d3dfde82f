"""The anywhere identity: AWS credentials from a License Manager license token, outside AWS.

On EKS Anywhere, ECS Anywhere, plain EC2 or an on-premises cluster there is no IRSA and no task
role. The buyer creates a license token (License Manager `CreateToken`) and an IAM role that
trusts License Manager's OIDC issuer; the chart mounts the token from a Kubernetes Secret as a
file. `license_session` turns the two into a boto3 session whose credentials refresh themselves:

    token file --GetAccessToken--> access token (1 h) --AssumeRoleWithWebIdentity--> credentials

as the reference `LicenseManagerTokenCredentialsProvider` in the AWS Marketplace Seller Guide
does ("Integrating an AWS Marketplace for Containers Anywhere with License Manager",
docs.aws.amazon.com/marketplace/latest/userguide/container-anywhere-license-manager-integration.html).
Both calls go unsigned: that guide's License Manager and STS clients use
`AnonymousCredentialsProvider` (there are no AWS credentials yet), although botocore's
license-manager model declares sigv4 for the whole service; STS's model marks
AssumeRoleWithWebIdentity `noAuth`. Like the Java reference, the file is read again at every
refresh, so a rotated Secret takes effect at the next one (botocore refreshes 15 minutes before
expiry, and must by 10).

Failures are raised as `AnywhereIdentityError` subclasses a platform team can act on (token file,
token rejected, role not assumable, AWS unreachable), each with an `ErrorInfo`. The license
token, the access token and the role's secret key and session token never reach a log or an
exception: every one of them is redacted from the botocore and urllib3 loggers' records (botocore
logs request and response bodies at DEBUG), and AWS's error messages are redacted too.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from botocore.exceptions import BotoCoreError

from sidecar.aws.errors import ErrorInfo, classify
from sidecar.core.clock import Clock, SystemClock
from sidecar.core.files import UnsafeFileError, read_small_file

if TYPE_CHECKING:
    import boto3

log = logging.getLogger(__name__)

# botocore's license-manager model: TokenString is `\S+`, at most 4096 characters. The file may
# hold a trailing newline (kubectl create secret --from-file) and nothing else.
TOKEN_MAX = 4096
FILE_LIMIT = 8192
_TOKEN_RE = re.compile(r"\S+")
# STS roleSessionNameType: 2..64 characters of [\w+=,.@-].
_SESSION_RE = re.compile(r"[^A-Za-z0-9_+=,.@-]")
SESSION_PREFIX = "marketplace-sidecar"
DEFAULT_TIMEOUT = 10.0
ATTEMPTS = 2  # per call; the caller (the contract core) is the retry layer
REDACTED = "[redacted]"

_BUYER_HINT = (
    "the buyer creates a license token for the license in AWS License Manager (CreateToken, "
    "with the role's ARN) and stores it in the Kubernetes Secret the chart mounts; the sidecar "
    "reads the file again at every credential refresh"
)
_ROLE_HINT = (
    "the role must trust License Manager's token issuer: Principal "
    '{"Federated": "openid-license-manager.amazonaws.com"}, Action sts:AssumeRoleWithWebIdentity, '
    "condition openid-license-manager.amazonaws.com:amr = "
    '"aws:license-manager:token-issuer-account-id:<buyer account>"; and the token must name '
    "this role (CreateToken --role-arns); see docs/contract-anywhere.md"
)
_UNAVAILABLE_HINT = (
    "License Manager or STS did not answer in time, throttled or failed; retried with backoff "
    "(check egress to license-manager.<region>.amazonaws.com and sts.<region>.amazonaws.com)"
)


class AnywhereIdentityError(BotoCoreError):
    """The anywhere identity could not produce credentials. `info` says what to do.

    A BotoCoreError, so code that guards AWS calls with `except BotoCoreError` also catches a
    failure raised from inside a client call (botocore refreshes credentials while signing).
    """

    fmt = "{message}; {hint}"
    code: ClassVar[str] = "AnywhereIdentityError"
    kind: ClassVar[str] = "configuration"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, hint: str) -> None:
        message, hint = redact(message)[:500], redact(hint)
        super().__init__(message=message, hint=hint)
        self.info = ErrorInfo(self.code, message, hint, self.kind, self.retryable)


class LicenseTokenFileError(AnywhereIdentityError):
    """The token file is missing, unreadable, empty, hostile or not a token.

    Retryable, as the other refusals: the buyer fixes the Secret (or the role) and the next
    attempt, which reads the file again, heals it without restarting the pod."""

    code = "LicenseTokenFileError"
    retryable = True


class LicenseTokenRejectedError(AnywhereIdentityError):
    """License Manager refused the token (expired, revoked, malformed, another account's)."""

    code = "LicenseTokenRejectedError"
    retryable = True


class RoleNotAssumableError(AnywhereIdentityError):
    """STS refused AssumeRoleWithWebIdentity (trust policy, role ARN, token's role list)."""

    code = "RoleNotAssumableError"
    retryable = True


class AnywhereIdentityUnavailableError(AnywhereIdentityError):
    """License Manager or STS did not answer, throttled, or failed on AWS's side: retry."""

    code = "AnywhereIdentityUnavailableError"
    kind = "transient"
    retryable = True


# --- secrets out of logs -----------------------------------------------------------------------

_SECRETS: deque[str] = deque(maxlen=16)  # current and recently rotated values
_SECRETS_LOCK = threading.Lock()
_LOGGER_PREFIXES = ("botocore", "boto3", "urllib3", "sidecar")


def _remember(*values: str | None) -> None:
    with _SECRETS_LOCK:
        for value in values:
            if value and len(value) >= 8 and value not in _SECRETS:
                _SECRETS.append(value)
    _install_filter()


# Fields whose values are secrets wherever botocore logs them: JSON bodies (License Manager's
# GetAccessToken request and answer), XML bodies (STS's credentials), the query-protocol
# parameters and the headers of signed requests. Answers are logged before they are parsed, so
# their values cannot be known in advance: these patterns take them out by name.
_SECRET_FIELDS = re.compile(
    r"""(?P<json>"(?:AccessToken|Token|WebIdentityToken|SecretAccessKey|SessionToken)"\s*:\s*")"""
    r"""[^"]*(?=")"""
    r"""|(?P<xml><(?P<tag>SecretAccessKey|SessionToken|WebIdentityToken)>)[^<]*(?=</(?P=tag)>)"""
    r"""|(?P<repr>'(?:AccessToken|Token|WebIdentityToken|SecretAccessKey|SessionToken)'\s*:\s*b?')"""
    r"""[^']*(?=')"""
    r"""|(?P<header>(?i:x-amz-security-token)(?:'\s*:\s*b?'|:))[^'\s]*"""
)


def _blank(match: re.Match[str]) -> str:
    prefix = match.group("json") or match.group("xml") or match.group("repr")
    return (prefix or match.group("header")) + REDACTED


def redact(text: str) -> str:
    """`text` without any secret this module has handled or any secret-named field's value."""
    with _SECRETS_LOCK:
        secrets = list(_SECRETS)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _SECRET_FIELDS.sub(_blank, text)


class _RedactSecrets(logging.Filter):
    """Rewrites a record whose text holds a secret. Loggers run their filters only when the
    level is enabled, so at INFO this costs nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a broken format is the logging module's report to make
            return True
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


_FILTER = _RedactSecrets()


def _install_filter() -> None:
    """Put the filter on every botocore, boto3, urllib3 and sidecar logger that exists now.

    A logger's filters see only records logged to that logger, not its children's, so each is
    given one; called at every refresh, it also reaches loggers created since.
    """
    manager = logging.Logger.manager
    for name, logger in list(manager.loggerDict.items()):
        if (
            isinstance(logger, logging.Logger)
            and name.startswith(_LOGGER_PREFIXES)
            and _FILTER not in logger.filters
        ):
            logger.addFilter(_FILTER)
    for name in _LOGGER_PREFIXES:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


# --- the token file ------------------------------------------------------------------------------


def read_token(path: Path) -> str:
    """The license token in `path`, or `LicenseTokenFileError` saying what is wrong with it.

    A Kubernetes Secret volume is a symlink farm, so links are followed; the target must still be
    a small regular file (core.files refuses FIFOs, devices and huge files without hanging).
    """
    where = f"license token file {path}"
    try:
        raw = read_small_file(path, FILE_LIMIT)
    except FileNotFoundError:
        raise LicenseTokenFileError(f"{where} does not exist", _BUYER_HINT) from None
    except UnsafeFileError as exc:
        raise LicenseTokenFileError(f"{where} {exc}", _BUYER_HINT) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise LicenseTokenFileError(f"{where} cannot be read: {reason}", _BUYER_HINT) from None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise LicenseTokenFileError(f"{where} is not UTF-8 text", _BUYER_HINT) from None
    if not text:
        raise LicenseTokenFileError(f"{where} is empty", _BUYER_HINT)
    if len(text) > TOKEN_MAX or not _TOKEN_RE.fullmatch(text):
        raise LicenseTokenFileError(
            f"{where} is not a license token (one line of at most {TOKEN_MAX} non-blank "
            f"characters; it holds {len(text)} characters)",
            _BUYER_HINT,
        )
    _remember(text)
    return text


# --- the exchange --------------------------------------------------------------------------------


def session_name(hostname: str | None = None) -> str:
    """`marketplace-sidecar-<pod name>`: the same for every refresh of one pod, and the pod it
    names shows in CloudTrail as the assumed role session."""
    host = socket.gethostname() if hostname is None else hostname
    host = _SESSION_RE.sub("-", host).strip("-")
    return f"{SESSION_PREFIX}-{host}"[:64] if host else SESSION_PREFIX


class _Exchange:
    """One refresh: read the file, GetAccessToken, AssumeRoleWithWebIdentity."""

    def __init__(
        self, token_file: Path, role_arn: str, region: str, name: str, timeout: float
    ) -> None:
        self.token_file, self.role_arn, self.region = token_file, role_arn, region
        self.session_name, self.timeout = name, timeout
        self._clients: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    def clients(self) -> tuple[Any, Any]:
        """Unsigned License Manager and STS clients with bounded timeouts, made once.

        A botocore session of their own: AWS_ENDPOINT_URL_LICENSE_MANAGER and
        AWS_ENDPOINT_URL_STS apply, and the credential chain is never consulted.
        """
        with self._lock:
            if self._clients is None:
                import botocore.session
                from botocore import UNSIGNED
                from botocore.config import Config

                config = Config(
                    signature_version=UNSIGNED,
                    connect_timeout=min(self.timeout, 5.0),
                    read_timeout=self.timeout,
                    retries={"mode": "standard", "total_max_attempts": ATTEMPTS},
                    user_agent_extra="marketplace-sidecar",
                )
                session = botocore.session.Session()
                self._clients = (
                    session.create_client(
                        "license-manager", region_name=self.region, config=config
                    ),
                    session.create_client("sts", region_name=self.region, config=config),
                )
            return self._clients

    def __call__(self) -> dict[str, str]:
        token = read_token(self.token_file)
        lm, sts = self.clients()
        access = _call(
            lambda: lm.get_access_token(Token=token)["AccessToken"],
            "License Manager GetAccessToken",
            LicenseTokenRejectedError,
            f"License Manager refused the license token in {self.token_file}",
            _BUYER_HINT,
            transient_codes={"RateLimitExceededException", "ServerInternalException"},
        )
        if not isinstance(access, str) or not access:
            raise AnywhereIdentityUnavailableError(
                "License Manager GetAccessToken answered without an AccessToken",
                _UNAVAILABLE_HINT,
            )
        _remember(access)
        answer = _call(
            lambda: sts.assume_role_with_web_identity(
                RoleArn=self.role_arn,
                RoleSessionName=self.session_name,
                WebIdentityToken=access,
            ),
            "STS AssumeRoleWithWebIdentity",
            RoleNotAssumableError,
            f"STS refused to let the license token assume {self.role_arn}",
            _ROLE_HINT,
            transient_codes={"IDPCommunicationError"},
        )
        creds = answer["Credentials"]
        _remember(creds["SecretAccessKey"], creds["SessionToken"])
        expiry: datetime = creds["Expiration"]
        log.info(
            "anywhere identity: credentials for %s (session %s, key %s) valid until %s",
            self.role_arn,
            self.session_name,
            creds["AccessKeyId"],
            expiry.isoformat(),
        )
        return {
            "access_key": creds["AccessKeyId"],
            "secret_key": creds["SecretAccessKey"],
            "token": creds["SessionToken"],
            "expiry_time": expiry.isoformat(),
        }


def _call(
    do: Any,
    what: str,
    refused: type[AnywhereIdentityError],
    refused_message: str,
    refused_hint: str,
    *,
    transient_codes: set[str],
) -> Any:
    """Run one AWS call; map its failure to a named error whose text holds no secret."""
    from botocore.exceptions import ClientError, ParamValidationError

    try:
        return do()
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "Unknown"))
        message = redact(str(err.get("Message", "")))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        info = classify(code, message, http_status=status)
        if info.retryable or code in transient_codes:
            raise AnywhereIdentityUnavailableError(
                f"{what} failed: {code}: {message}", _UNAVAILABLE_HINT
            ) from None
        raise refused(f"{refused_message}: {code}: {message}", refused_hint) from None
    except ParamValidationError as exc:
        raise refused(f"{refused_message}: {redact(str(exc))}", refused_hint) from None
    except BotoCoreError as exc:  # transport: refused connect, timeout, reset
        if isinstance(exc, AnywhereIdentityError):
            raise
        raise AnywhereIdentityUnavailableError(
            f"{what} failed: {type(exc).__name__}: {redact(str(exc))}", _UNAVAILABLE_HINT
        ) from None


def license_session(
    token_file: Path,
    role_arn: str,
    region: str,
    *,
    clock: Clock | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    role_session_name: str | None = None,
) -> boto3.Session:
    """A boto3 session for `region` whose credentials come from the license token.

    Nothing is read or called here: the first client call fetches the credentials (raising an
    `AnywhereIdentityError` from that call if it cannot), and later calls refresh them before
    they expire by `clock`. `timeout` bounds each attempt of each call (two attempts each).
    """
    import boto3
    import botocore.session
    from botocore.credentials import (
        CredentialProvider,
        CredentialResolver,
        Credentials,
        DeferredRefreshableCredentials,
    )

    clock = clock or SystemClock()
    exchange = _Exchange(
        Path(token_file), role_arn, region, role_session_name or session_name(), timeout
    )

    def now() -> datetime:
        return datetime.fromtimestamp(clock.time(), UTC)

    class LicenseTokenProvider(CredentialProvider):
        METHOD = "license-manager-token"
        CANONICAL_NAME = "LicenseManagerToken"

        def load(self) -> Credentials:
            return DeferredRefreshableCredentials(
                refresh_using=exchange, method=self.METHOD, time_fetcher=now
            )

    _install_filter()
    core = botocore.session.Session()
    core.register_component("credential_provider", CredentialResolver([LicenseTokenProvider()]))
    core.set_config_variable("region", region)
    return boto3.Session(botocore_session=core, region_name=region)
