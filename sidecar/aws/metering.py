"""The AWS Marketplace Metering Service, through boto3. The only module that imports boto3.

botocore's own retries are switched off (one attempt per call): the registrar is the single
retry layer, so every attempt is visible in the state, the logs and the call count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.aws.errors import ErrorInfo, classify

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


class MeteringGateway:
    def __init__(self, region: str, timeout: float, first_timeout: float | None = None) -> None:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=min(timeout, 5.0),
            read_timeout=timeout,
            user_agent_extra="marketplace-sidecar",
        )
        self._client: MarketplaceMeteringClient = boto3.client(
            "meteringmarketplace", region_name=region, config=config
        )
        # The pod's first call waits longer: its answer (AWS's only entitlement check) cannot
        # be asked for again. Same client settings otherwise; dropped after the first answer.
        self._first_client: MarketplaceMeteringClient | None = None
        if first_timeout is not None and first_timeout > timeout:
            self._first_client = boto3.client(
                "meteringmarketplace",
                region_name=region,
                config=config.merge(Config(read_timeout=first_timeout)),
            )

    @property
    def endpoint(self) -> str:
        return str(self._client.meta.endpoint_url)

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
            raise AwsCallError(classify(type(exc).__name__, str(exc))) from None
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
            raise AwsCallError(classify(type(exc).__name__, str(exc))) from None
        return str(resp.get("MeteringRecordId") or ("DryRunOperation" if dry_run else ""))


def _client_error(response: Any) -> ErrorInfo:
    error = response.get("Error", {})
    meta = response.get("ResponseMetadata", {})
    return classify(
        str(error.get("Code") or "Unknown"),
        str(error.get("Message") or ""),
        http_status=meta.get("HTTPStatusCode"),
        request_id=meta.get("RequestId"),
    )
