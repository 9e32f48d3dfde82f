"""The AWS Marketplace Metering Service, through a botocore client (boto3 is never imported here).

botocore's own retries are switched off (one attempt per call): the registrar is the single
retry layer, so every attempt is visible in the state, the logs and the call count.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

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


SERVICE = "meteringmarketplace"
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
