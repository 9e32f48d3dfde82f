"""The AWS Marketplace Metering Service, through a botocore client (boto3 is never imported here).

botocore's own retries are switched off (one attempt per call): the registrar is the single
retry layer, so every attempt is visible in the state, the logs and the call count.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sidecar.aws.errors import ErrorInfo, classify, for_endpoint

if TYPE_CHECKING:
    from mypy_boto3_meteringmarketplace import MarketplaceMeteringClient


class AwsCallError(Exception):
    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(f"{info.code}: {info.message}")
        self.info = info


@dataclass(frozen=True)
class Registration:
    signature: str
    rotation_at: float | None
    request_id: str | None


SERVICE = "meteringmarketplace"
# BatchMeterUsage limits (AWS API reference). botocore checks neither the 25-record cap (its
# validator checks minimums only) nor the size. "1 MB" is read as 1,000,000 bytes: a request
# under that is under either meaning of the unit.
MAX_BATCH_RECORDS = 25
MAX_BATCH_BYTES = 1_000_000
# endpoints.json keys kept: this service and those botocore's credential providers create
# clients for from the same session (STS for IRSA and assumed roles, SSO).
ENDPOINTS_KEPT = frozenset({"metering.marketplace", "sts", "portal.sso", "oidc"})


def _session() -> Any:
    """A botocore session that loads what one Metering client needs, and keeps only that.

    - `create_client` checks the service name against a listing of botocore's data folder
      (about 900 listdir and 2,700 stat calls, some 40% of the client's construction): the
      loader answers that check by looking for the one service asked about.
    - endpoints.json (1.2 MB, every service in every partition) stays in memory as about
      6 MiB of dicts for the life of the client: only the entries of ENDPOINTS_KEPT are kept
      (the partitions, their regions and defaults are untouched, so resolution is the same).
    """
    import botocore.loaders
    import botocore.session
    from botocore.exceptions import DataNotFoundError

    class OneServiceFiles(botocore.loaders.JSONFileLoader):
        def load_file(self, file_path: str) -> Any:
            if os.path.basename(file_path) == "endpoints":
                try:
                    with open(file_path + ".json", encoding="utf-8") as f:
                        text = _only_services(f.read(), ENDPOINTS_KEPT)
                    return json.loads(text, object_pairs_hook=OrderedDict)
                except (OSError, ValueError):
                    pass  # compressed or unexpected: botocore's own loading, then pruned
            data = super().load_file(file_path)
            if data is not None and os.path.basename(file_path) == "endpoints":
                for partition in data.get("partitions", []):
                    services = partition.get("services", {})
                    partition["services"] = {
                        k: v for k, v in services.items() if k in ENDPOINTS_KEPT
                    }
            return data

    class OneServiceLoader(botocore.loaders.Loader):
        def list_available_services(self, type_name: str) -> list[str]:
            return AskedFor([SERVICE], self, type_name)

    class AskedFor(list[str]):
        """`name in known_services`, answered for that name alone."""

        def __init__(self, names: list[str], loader: Any, type_name: str) -> None:
            super().__init__(names)
            self._loader, self._type = loader, type_name

        def __contains__(self, name: object) -> bool:
            try:
                return isinstance(name, str) and bool(
                    self._loader.list_api_versions(name, self._type)
                )
            except DataNotFoundError:
                return False

    session = botocore.session.get_session()
    data_path = session.get_config_variable("data_path")  # AWS_DATA_PATH, as botocore reads it
    extra = [os.path.expanduser(p) for p in data_path.split(os.pathsep)] if data_path else None
    loader = OneServiceLoader(extra_search_paths=extra, file_loader=OneServiceFiles())
    session.register_component("data_loader", loader)
    return session


def _only_services(text: str, keep: frozenset[str]) -> str:
    """endpoints.json text with each partition's "services" reduced to those in `keep`.

    Each service is decoded and dropped one at a time, so the 1.2 MB document never exists as
    objects all at once (their memory would stay with the process). ValueError if the text is
    not shaped as expected.
    """
    decoder = json.JSONDecoder()
    out: list[str] = []
    pos = 0
    for match in re.finditer(r'"services"\s*:\s*\{', text):
        if match.start() < pos:
            raise ValueError("nested services")
        i = match.end()
        kept: dict[str, Any] = {}
        while True:
            i = _skip(text, i)
            if text[i] == "}":
                break
            name, i = decoder.raw_decode(text, i)
            i = _skip(text, i)
            if text[i] != ":":
                raise ValueError("expected ':'")
            value, i = decoder.raw_decode(text, _skip(text, i + 1))
            if name in keep:
                kept[name] = value
            i = _skip(text, i)
            if text[i] == ",":
                i += 1
        out += [text[pos : match.start()], '"services": ', json.dumps(kept)]
        pos = i + 1
    out.append(text[pos:])
    return "".join(out)


def _skip(text: str, i: int) -> int:
    while text[i] in " \t\r\n":
        i += 1
    return i


class MeteringGateway:
    def __init__(self, region: str, timeout: float, first_timeout: float | None = None) -> None:
        # botocore's own session, not boto3.client: the same client, credential chain and
        # AWS_ENDPOINT_URL_* handling, without importing boto3 and s3transfer (never used here);
        # benchmarks/startup.py measured it.
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=min(timeout, 5.0),
            read_timeout=timeout,
            user_agent_extra="marketplace-sidecar",
        )
        self._client = cast(
            "MarketplaceMeteringClient",
            _session().create_client(SERVICE, region_name=region, config=config),
        )
        # The pod's first call waits longer: its answer (AWS's only entitlement check) cannot
        # be asked for again. Same client settings otherwise; dropped after the first answer.
        self._first_client: MarketplaceMeteringClient | None = None
        if first_timeout is not None and first_timeout > timeout:
            self._first_client = cast(
                "MarketplaceMeteringClient",
                _session().create_client(
                    SERVICE,
                    region_name=region,
                    config=config.merge(Config(read_timeout=first_timeout)),
                ),
            )

    @property
    def endpoint(self) -> str:
        return str(self._client.meta.endpoint_url)

    def _local(self, info: ErrorInfo) -> ErrorInfo:
        """Against the emulator, say what to set locally, not which AWS role to use."""
        return for_endpoint(info, self.endpoint)

    def register_usage(
        self, product_code: str, version: int, nonce: str, *, first: bool = False
    ) -> Registration:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client
        if first and self._first_client is not None:
            client = self._first_client
        elif not first:
            self._first_client = None
        try:
            resp = client.register_usage(
                ProductCode=product_code, PublicKeyVersion=version, Nonce=nonce
            )
        except ClientError as exc:
            raise AwsCallError(_client_error(exc.response)) from None
        except BotoCoreError as exc:
            # The class name says whether the request surely never left (connect errors) or
            # may have reached AWS (read timeout, reset after send): see errors.UNSENT_CODES.
            raise AwsCallError(self._local(classify(type(exc).__name__, str(exc)))) from None
        rotation = resp.get("PublicKeyRotationTimestamp")
        return Registration(
            signature=resp["Signature"],
            rotation_at=rotation.timestamp() if rotation is not None else None,
            request_id=resp.get("ResponseMetadata", {}).get("RequestId"),
        )

    # -- MeterUsage (custom-metered products) ---------------------------------------------

    def meter_usage(self, request: dict[str, Any], dry_run: bool = False) -> str:
        """Send one stored MeterUsage request exactly as stored; its MeteringRecordId.

        `request` holds ProductCode, Timestamp (epoch seconds), UsageDimension, UsageQuantity,
        ClientToken and optionally UsageAllocations. With `dry_run` (a permission check, no
        record), success is "DryRunOperation" whether AWS answers 200 or that error code.
        """
        from datetime import UTC, datetime

        from botocore.exceptions import BotoCoreError, ClientError

        params: dict[str, Any] = dict(request)
        params["Timestamp"] = datetime.fromtimestamp(float(request["Timestamp"]), UTC)
        if dry_run:
            params["DryRun"] = True
        try:
            resp = self._client.meter_usage(**params)
        except ClientError as exc:
            info = _client_error(exc.response)
            if dry_run and info.code == "DryRunOperation":
                return "DryRunOperation"
            raise AwsCallError(info) from None
        except BotoCoreError as exc:
            raise AwsCallError(self._local(classify(type(exc).__name__, str(exc)))) from None
        return str(resp.get("MeteringRecordId") or ("DryRunOperation" if dry_run else ""))

    # -- SaaS: ResolveCustomer and BatchMeterUsage -----------------------------------------

    def resolve_customer(self, token: str) -> dict[str, Any]:
        """One ResolveCustomer call: AWS's answer minus ResponseMetadata.

        The token is the buyer's credential for this subscription: it never appears in full in
        a log line or an error message (errors quote it as `redact_token`).
        """
        from botocore.exceptions import BotoCoreError, ClientError

        _install_token_filter()
        try:
            resp = self._client.resolve_customer(RegistrationToken=token)
        except ClientError as exc:
            info = _client_error(exc.response, "ResolveCustomer")
            raise AwsCallError(_scrubbed(info, token)) from None
        except BotoCoreError as exc:
            info = self._local(classify(type(exc).__name__, str(exc), operation="ResolveCustomer"))
            raise AwsCallError(_scrubbed(info, token)) from None
        return {k: v for k, v in resp.items() if k != "ResponseMetadata"}

    def batch_meter_usage(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one stored BatchMeterUsage request as is; Results and UnprocessedRecords.

        `request` holds UsageRecords (Timestamp in epoch seconds) and, for CustomerIdentifier
        records, ProductCode. More than 25 records or a body of 1 MB or more is a caller bug:
        ValueError, nothing sent (AWS would refuse it; botocore would not). Timestamps in the
        answer are int epoch seconds, as in the request.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        records = request.get("UsageRecords")
        if not isinstance(records, list):
            raise ValueError("UsageRecords must be a list")
        if len(records) > MAX_BATCH_RECORDS:
            raise ValueError(
                f"BatchMeterUsage takes at most {MAX_BATCH_RECORDS} records; got {len(records)}"
            )
        params = _with_datetimes(request)
        size = self._body_bytes("BatchMeterUsage", params)
        if size >= MAX_BATCH_BYTES:
            raise ValueError(
                f"BatchMeterUsage requests must be under {MAX_BATCH_BYTES} bytes; "
                f"this one is {size}"
            )
        try:
            resp = self._client.batch_meter_usage(**params)
        except ClientError as exc:
            raise AwsCallError(_client_error(exc.response, "BatchMeterUsage")) from None
        except BotoCoreError as exc:
            raise AwsCallError(
                self._local(classify(type(exc).__name__, str(exc), operation="BatchMeterUsage"))
            ) from None
        results: list[dict[str, Any]] = []
        for answered in resp.get("Results") or []:
            result: dict[str, Any] = dict(answered)
            if "UsageRecord" in result:
                result["UsageRecord"] = _records_out([result["UsageRecord"]])[0]
            results.append(result)
        return {
            "Results": results,
            "UnprocessedRecords": _records_out(resp.get("UnprocessedRecords")),
        }

    def _body_bytes(self, operation: str, params: dict[str, Any]) -> int:
        """The exact body botocore would send (its own serializer, without validation)."""
        from botocore.serialize import create_serializer

        model = self._client.meta.service_model
        serializer = create_serializer(model.protocol, include_validation=False)
        try:
            body = serializer.serialize_to_request(params, model.operation_model(operation))
        except Exception:  # a malformed request: botocore's own call reports it
            return batch_request_bytes(params)
        data = body.get("body") or b""
        return len(data if isinstance(data, bytes) else str(data).encode("utf-8"))


def _scrubbed(info: ErrorInfo, token: str) -> ErrorInfo:
    """The error with any echo of the registration token cut down to its first characters."""
    if not token or token not in info.message:
        return info
    from dataclasses import replace

    return replace(info, message=info.message.replace(token, redact_token(token)))


def _client_error(response: Any, operation: str | None = None) -> ErrorInfo:
    error = response.get("Error", {})
    meta = response.get("ResponseMetadata", {})
    return classify(
        str(error.get("Code") or "Unknown"),
        str(error.get("Message") or ""),
        http_status=meta.get("HTTPStatusCode"),
        request_id=meta.get("RequestId"),
        operation=operation,
    )


# -- BatchMeterUsage helpers --------------------------------------------------------------


def _epoch(value: Any) -> int:
    """A timestamp (datetime from botocore's parser, or epoch seconds) as int epoch seconds."""
    if hasattr(value, "timestamp"):
        return int(value.timestamp())
    return int(float(value))


def _wire_timestamp(value: Any) -> Any:
    """Epoch seconds become an aware datetime (what botocore expects); datetimes pass through."""
    from datetime import UTC, datetime

    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), UTC)
    return value


def _with_datetimes(request: dict[str, Any]) -> dict[str, Any]:
    params = dict(request)
    records = request.get("UsageRecords")
    if isinstance(records, list):
        params["UsageRecords"] = [
            {**r, "Timestamp": _wire_timestamp(r["Timestamp"])}
            if isinstance(r, dict) and "Timestamp" in r
            else r
            for r in records
        ]
    return params


def batch_request_bytes(request: dict[str, Any]) -> int:
    """The size of a BatchMeterUsage request body as botocore sends it (awsJson1.1).

    For callers that split records into calls under MAX_BATCH_BYTES; epoch-second timestamps
    are serialised as whole seconds, as botocore does for a datetime without microseconds.
    """

    def wire(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _wire_value(k, v) for k, v in value.items()}
        return value

    def _wire_value(key: str, value: Any) -> Any:
        if key == "Timestamp":
            return _epoch(value)
        if isinstance(value, list):
            return [wire(v) for v in value]
        return wire(value)

    return len(json.dumps(wire(request)).encode("utf-8"))


def _records_out(records: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for record in records or []:
        record = dict(record)
        if "Timestamp" in record:
            record["Timestamp"] = _epoch(record["Timestamp"])
        out.append(record)
    return out


# -- registration tokens never reach a log in full ----------------------------------------

_TOKEN_FIELD = re.compile(r'("RegistrationToken"\s*:\s*")([^"]{0,6})[^"]*(")')


def redact_token(token: str) -> str:
    """Enough of a registration token to tell two apart in a log, never enough to redeem it."""
    return f"{token[:6]}…({len(token)} chars)" if len(token) > 6 else "…"


class _RedactRegistrationTokens(logging.Filter):
    """botocore logs each request body at DEBUG ("Making request ... with params"): with a
    seller's DEBUG logging, that body holds the buyer's registration token. Keep its first
    characters only."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a broken record is logging's business, not ours
            return True
        if "RegistrationToken" in text:
            record.msg = _TOKEN_FIELD.sub(r"\1\2…\3", text)
            record.args = None
        return True


_filter_lock = threading.Lock()
_filter_installed = False


def _install_token_filter() -> None:
    global _filter_installed
    with _filter_lock:
        if not _filter_installed:
            for name in ("botocore.endpoint", "botocore.hooks", "botocore.parsers"):
                logging.getLogger(name).addFilter(_RedactRegistrationTokens())
            _filter_installed = True
