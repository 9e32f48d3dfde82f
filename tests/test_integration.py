"""The real `marketplace-sidecar run` process against the emulator, over loopback HTTP."""

from __future__ import annotations

import json
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

import jwt
import pytest
import requests

from sidecar.emulator.service import TOKEN_FAULTS, Emulator, EmulatorServer
from tests.helpers import Launch
from tests.relay import SlowRelay


def test_entitled_start_serves_a_verified_token(launch: Launch, emulator: Emulator) -> None:
    car = launch()
    doc = car.wait_for(lambda d: d["state"] == "entitled")
    assert doc["entitled"] is True and doc["error"] is None
    claims = jwt.decode(doc["token"], emulator.key.public_key(), algorithms=["PS256"])
    assert claims == doc["claims"]
    assert claims["nonce"] == emulator.calls[-1]["nonce"]
    assert car.get("/readyz", probe=True).status_code == 200
    assert car.get("/healthz", probe=True).json()["status"] == "ok"
    assert doc["next_registration_at"] is not None


@pytest.mark.parametrize(
    ("setting", "code", "kind"),
    [
        ({"entitled": False}, "CustomerNotEntitledException", "entitlement"),
        ({"platform_supported": False}, "PlatformNotSupportedException", "platform"),
        ({"product_codes": ["someone-else"]}, "InvalidProductCodeException", "configuration"),
        ({"key_versions": [2]}, "InvalidPublicKeyVersionException", "configuration"),
        ({"region": "eu-west-1"}, "InvalidRegionException", "configuration"),
        (
            {"faults": [{"error": "AccessDeniedException", "first": 1}]},
            "AccessDeniedException",
            "configuration",
        ),
    ],
)
def test_terminal_first_call_is_not_entitled_with_the_real_error(
    launch: Launch, emulator: Emulator, setting: dict[str, object], code: str, kind: str
) -> None:
    emulator.reconfigure(setting)
    car = launch()
    doc = car.wait_for(lambda d: d["state"] == "not_entitled")
    assert (doc["error"]["code"], doc["error"]["kind"]) == (code, kind)
    assert doc["error"]["hint"] and doc["token"] is None
    ready = car.get("/readyz", probe=True)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == code
    assert car.get("/healthz", probe=True).status_code == 200  # no restart loop
    time.sleep(0.5)
    assert len(emulator.calls) == 1  # AWS: terminate on non-throttling start-up errors


def test_throttling_and_5xx_at_start_are_retried_until_entitled(
    launch: Launch, emulator: Emulator
) -> None:
    emulator.reconfigure(
        {
            "faults": [
                {"error": "ThrottlingException", "first": 2},
                {"error": "InternalServiceErrorException", "first": 1, "after": 2},
                {"error": "ConnectionReset", "first": 1, "after": 3},
            ]
        }
    )
    car = launch()
    doc = car.wait_for(lambda d: d["state"] == "entitled")
    codes = [c["code"] for c in emulator.calls]
    assert codes == [
        "ThrottlingException",
        "ThrottlingException",
        "InternalServiceErrorException",
        "ConnectionReset",
        "ok",
    ]
    assert doc["consecutive_failures"] == 0


def test_registering_state_is_visible_while_retrying(launch: Launch, emulator: Emulator) -> None:
    emulator.reconfigure({"faults": [{"error": "ThrottlingException", "rate": 1.0}]})
    car = launch(MARKETPLACE_BACKOFF_BASE_SECONDS="0.2", MARKETPLACE_BACKOFF_CAP_SECONDS="0.2")
    doc = car.wait_for(lambda d: d["consecutive_failures"] >= 2)
    assert doc["state"] == "registering" and doc["error"]["retryable"] is True
    assert car.get("/readyz", probe=True).status_code == 503


def test_gives_up_at_the_deadline(launch: Launch, emulator: Emulator) -> None:
    emulator.reconfigure({"faults": [{"error": "InternalServiceErrorException", "rate": 1.0}]})
    car = launch(MARKETPLACE_REGISTER_DEADLINE_SECONDS="1")
    doc = car.wait_for(lambda d: d["state"] == "not_entitled", timeout=5)
    assert doc["error"]["code"] == "InternalServiceErrorException"
    calls = len(emulator.calls)
    time.sleep(0.6)
    assert len(emulator.calls) == calls


def test_reregistration_failure_is_degraded_then_entitled_again(
    launch: Launch, emulator: Emulator
) -> None:
    car = launch(MARKETPLACE_REGISTER_INTERVAL_SECONDS="1", MARKETPLACE_REGISTER_JITTER="0")
    car.wait_for(lambda d: d["state"] == "entitled")
    emulator.reconfigure({"faults": [{"error": "InternalServiceErrorException", "rate": 1.0}]})
    doc = car.wait_for(lambda d: d["state"] == "degraded", timeout=5)
    assert doc["entitled"] is True and doc["token"] is not None
    assert car.get("/readyz", probe=True).status_code == 200
    emulator.reconfigure({"faults": []})
    doc = car.wait_for(
        lambda d: d["state"] == "entitled" and d["consecutive_failures"] == 0, timeout=5
    )


def test_unsubscribe_after_start_is_not_a_revocation(launch: Launch, emulator: Emulator) -> None:
    car = launch(MARKETPLACE_REGISTER_INTERVAL_SECONDS="1", MARKETPLACE_REGISTER_JITTER="0")
    car.wait_for(lambda d: d["state"] == "entitled")
    emulator.reconfigure({"entitled": False})
    changed = time.time()
    # Two re-registrations after the change: the registrar sends one call at a time, so when
    # AWS has seen the second, the sidecar has taken in the answer to the first.
    deadline = time.monotonic() + 30
    while sum(c["op"] == "RegisterUsage" and c["at"] > changed for c in emulator.calls) < 2:
        assert time.monotonic() < deadline, "the sidecar never re-registered after the change"
        time.sleep(0.05)
    assert car.entitlement()["state"] == "entitled"


@pytest.mark.parametrize("fault", [f for f in TOKEN_FAULTS if f != "future_iat"])
def test_a_bad_token_is_never_entitled(launch: Launch, emulator: Emulator, fault: str) -> None:
    emulator.reconfigure({"token_fault": fault})
    car = launch()
    doc = car.wait_for(lambda d: d["state"] == "not_entitled")
    assert doc["error"]["code"].startswith("TokenVerificationFailed:")
    assert doc["error"]["kind"] == "verification" and doc["token"] is None
    assert doc["entitled"] is False


def test_a_token_from_the_future_is_a_clock_problem_retried_until_the_clock_heals(
    launch: Launch, emulator: Emulator
) -> None:
    emulator.reconfigure({"token_fault": "future_iat"})  # AWS's clock a day ahead of ours
    car = launch()
    doc = car.wait_for(lambda d: d["consecutive_failures"] >= 2)
    assert doc["state"] == "registering" and doc["entitled"] is False and doc["token"] is None
    assert (doc["error"]["code"], doc["error"]["kind"]) == ("ClockSkew", "clock")
    assert doc["error"]["retryable"] and "clock" in doc["error"]["hint"]
    emulator.reconfigure({"token_fault": None})  # the clock is fixed
    car.wait_for(lambda d: d["state"] == "entitled", timeout=10)


def test_a_bad_token_on_reregistration_is_not_entitled(launch: Launch, emulator: Emulator) -> None:
    car = launch(MARKETPLACE_REGISTER_INTERVAL_SECONDS="1", MARKETPLACE_REGISTER_JITTER="0")
    car.wait_for(lambda d: d["state"] == "entitled")
    emulator.reconfigure({"token_fault": "other_key"})
    doc = car.wait_for(lambda d: d["state"] == "not_entitled", timeout=5)
    assert doc["error"]["code"] == "TokenVerificationFailed:bad_signature"
    assert car.get("/readyz", probe=True).status_code == 503


def test_key_rotation_is_a_warning(launch: Launch, emulator: Emulator) -> None:
    emulator.reconfigure({"rotation_at": 1_800_000_000})
    doc = launch().wait_for(lambda d: d["state"] == "entitled")
    assert any("PUBLIC_KEY_VERSION" in w for w in doc["warnings"])


def test_sigterm_stops_within_two_seconds_with_exit_0(launch: Launch) -> None:
    car = launch()
    car.wait_for(lambda d: d["state"] == "entitled")
    started = time.monotonic()
    car.proc.send_signal(signal.SIGTERM)
    assert car.proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 2.0


def test_sigint_during_a_slow_call_stops_quickly(launch: Launch, emulator: Emulator) -> None:
    emulator.reconfigure({"latency": 3.0})
    car = launch()
    time.sleep(0.3)
    started = time.monotonic()
    car.proc.send_signal(signal.SIGINT)
    assert car.proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 2.0
    # The emulator records the abandoned call when its 3 s latency ends: wait for it here, or
    # it lands in the next test's call log (the sidecar now starts fast enough for that).
    deadline = time.monotonic() + 5
    while not emulator.calls and time.monotonic() < deadline:
        time.sleep(0.05)


def test_logs_are_json_and_never_contain_the_token(launch: Launch, emulator: Emulator) -> None:
    import json

    car = launch()
    token = car.wait_for(lambda d: d["state"] == "entitled")["token"]
    car.stop()
    lines = [json.loads(line) for line in car.logs().splitlines() if line.strip()]
    events = [line["event"] for line in lines]
    assert {"starting", "registered", "state_changed", "stopping"} <= set(events)
    text = json.dumps(lines)
    assert token not in text and token.split(".")[2] not in text
    assert "BEGIN PUBLIC KEY" not in text


def test_a_restarted_sidecar_remembers_the_pods_verdict(
    launch: Launch, emulator: Emulator, tmp_path: object
) -> None:
    import pathlib

    state = pathlib.Path(str(tmp_path))
    emulator.reconfigure({"entitled": False})
    first = launch(MARKETPLACE_STATE_DIR=str(state), AWS_ACCESS_KEY_ID="same-pod")
    first.wait_for(lambda d: d["state"] == "not_entitled")
    first.stop()
    # AWS would now answer the same pod's next call with a token: the verdict must stand.
    second = launch(MARKETPLACE_STATE_DIR=str(state), AWS_ACCESS_KEY_ID="same-pod")
    doc = second.wait_for(lambda d: d["state"] == "not_entitled")
    assert doc["error"]["code"] == "CustomerNotEntitledException"
    assert "recorded earlier in this pod" in doc["error"]["message"]
    assert len(emulator.calls) == 1
    # Without the remembered verdict the same pod's second call really would succeed.
    third = launch(AWS_ACCESS_KEY_ID="same-pod")
    assert third.wait_for(lambda d: d["state"] != "registering")["state"] == "entitled"


def test_a_sidecar_killed_after_the_refusal_stays_refused_when_restarted_in_place(
    launch: Launch, emulator: Emulator, tmp_path: object
) -> None:
    """ECS restarts a crashed sidecar in place (restartPolicy) on the same state volume: the
    first process is refused and SIGKILLed (nothing flushed at exit); the second must stay
    not entitled without a new call, though AWS would now answer the same pod with a token."""
    import pathlib

    state = pathlib.Path(str(tmp_path))
    emulator.reconfigure({"entitled": False})
    first = launch(MARKETPLACE_STATE_DIR=str(state), AWS_ACCESS_KEY_ID="same-task")
    first.wait_for(lambda d: d["state"] == "not_entitled")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(5)
    second = launch(MARKETPLACE_STATE_DIR=str(state), AWS_ACCESS_KEY_ID="same-task")
    doc = second.wait_for(lambda d: d["state"] != "registering")
    assert doc["state"] == "not_entitled", doc
    assert doc["error"]["code"] == "CustomerNotEntitledException"
    assert len(emulator.calls) == 1


def test_a_slow_call_from_before_an_emulator_reset_does_not_leak_into_the_next_test(
    emulator: Emulator,
) -> None:
    # The cause of a flaky call count here: an earlier test's 3 s-latency call landed after the
    # next test's reset and was counted (and marked its pod seen) there.
    body = json.dumps({"ProductCode": "prod-abc", "PublicKeyVersion": 1, "Nonce": "n"}).encode()
    auth = (
        "AWS4-HMAC-SHA256 Credential=old-pod/20260101/us-east-1/aws-marketplace/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=0"
    )
    emulator.reconfigure({"latency": 0.5})
    call = threading.Thread(
        target=emulator.handle, args=("AWSMPMeteringService.RegisterUsage", body, auth)
    )
    call.start()
    time.sleep(0.1)
    emulator.reset()
    emulator.reconfigure({"entitled": False})
    call.join()
    assert emulator.calls == []
    status, answer = emulator.handle("AWSMPMeteringService.RegisterUsage", body, auth)
    assert status == 400 and answer is not None
    assert answer["__type"] == "CustomerNotEntitledException"  # the old call left no trace


def test_transient_give_up_is_not_remembered(
    launch: Launch, emulator: Emulator, tmp_path: object
) -> None:
    import pathlib

    state = pathlib.Path(str(tmp_path))
    emulator.reconfigure({"faults": [{"error": "InternalServiceErrorException", "rate": 1.0}]})
    car = launch(MARKETPLACE_STATE_DIR=str(state), MARKETPLACE_REGISTER_DEADLINE_SECONDS="1")
    car.wait_for(lambda d: d["state"] == "not_entitled", timeout=5)
    assert not (state / "verdict.json").exists()


def test_logs_are_quiet_when_nothing_changes(launch: Launch, emulator: Emulator) -> None:
    import json

    car = launch(MARKETPLACE_REGISTER_INTERVAL_SECONDS="1", MARKETPLACE_REGISTER_JITTER="0")
    car.wait_for(lambda d: d["state"] == "entitled")
    time.sleep(2.5)
    car.stop()
    lines = [json.loads(line) for line in car.logs().splitlines() if line.strip()]
    assert len(emulator.calls) >= 3  # several re-registrations happened...
    info = [line["event"] for line in lines if line["level"] == "info"]
    assert info.count("registered") == 1  # ...but only the state change was logged
    assert info.count("state_changed") == 1


# -- the pod's first call, through a slow relay (issue: entitlement won without a subscription)


@pytest.fixture
def relay(emulator_server: EmulatorServer) -> Iterator[Callable[..., SlowRelay]]:
    made: list[SlowRelay] = []

    def _make(delay: float, hold: int = 1) -> SlowRelay:
        r = SlowRelay(int(emulator_server.server_address[1]), delay, hold)
        made.append(r)
        return r

    yield _make
    for r in made:
        r.close()


def test_a_challenge_racing_the_first_call_gets_503_and_the_refusal_stands(
    launch: Launch, emulator: Emulator, relay: Callable[..., SlowRelay]
) -> None:
    emulator.reconfigure({"entitled": False})
    slow = relay(2.0)
    car = launch(AWS_ENDPOINT_URL_MARKETPLACE_METERING=slow.url)
    assert slow.answer_held.wait(10)  # AWS refused; the refusal is on its way, 2 s late
    resp = requests.post(car.api + "/v1/entitlement/challenge", json={"nonce": "n"}, timeout=10)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "registering"
    assert 1 <= int(resp.headers["Retry-After"]) <= 30
    doc = car.wait_for(lambda d: d["state"] != "registering", timeout=10)
    assert doc["state"] == "not_entitled" and doc["token"] is None
    assert doc["error"]["code"] == "CustomerNotEntitledException"
    assert car.get("/readyz", probe=True).status_code == 503
    assert len(emulator.calls) == 1  # the challenge never reached AWS
    after = requests.post(car.api + "/v1/entitlement/challenge", json={"nonce": "m"}, timeout=10)
    assert after.status_code == 403 and len(emulator.calls) == 1


def test_a_slow_first_answer_is_waited_for_longer_than_reregistrations(
    launch: Launch, emulator: Emulator
) -> None:
    # AWS takes 3 s; re-registrations give up after 2 s, the first call waits (default 30 s).
    emulator.reconfigure({"entitled": False, "latency": 3.0})
    car = launch(MARKETPLACE_AWS_TIMEOUT_SECONDS="2")
    doc = car.wait_for(lambda d: d["state"] != "registering", timeout=10)
    assert doc["state"] == "not_entitled"
    assert doc["error"]["code"] == "CustomerNotEntitledException"
    assert len(emulator.calls) == 1


LOST_ANSWER_ENV = {
    "MARKETPLACE_AWS_TIMEOUT_SECONDS": "0.5",
    "MARKETPLACE_FIRST_CALL_TIMEOUT_SECONDS": "1",
}


def test_a_lost_first_answer_is_served_with_a_warning_metric_and_log(
    launch: Launch, emulator: Emulator, relay: Callable[..., SlowRelay]
) -> None:
    emulator.reconfigure({"entitled": False})
    slow = relay(5.0)  # the refusal never arrives in time: read timeout
    car = launch(AWS_ENDPOINT_URL_MARKETPLACE_METERING=slow.url, **LOST_ANSWER_ENV)
    doc = car.wait_for(lambda d: d["state"] != "registering", timeout=10)
    # AWS's semantics: the retry is the pod's second call, answered with a token.
    assert doc["state"] == "entitled"
    assert [c["code"] for c in emulator.calls] == ["CustomerNotEntitledException", "ok"]
    assert any(w.startswith("first_answer_lost") for w in doc["warnings"])
    metrics = car.get("/metrics", probe=True).text
    assert "marketplace_first_answer_lost 1.0" in metrics
    car.stop()
    assert '"event":"first_answer_lost"' in car.logs()


def test_strict_mode_refuses_a_lost_first_answer_and_makes_no_second_call(
    launch: Launch, emulator: Emulator, relay: Callable[..., SlowRelay]
) -> None:
    emulator.reconfigure({"entitled": False})
    slow = relay(5.0)
    car = launch(
        AWS_ENDPOINT_URL_MARKETPLACE_METERING=slow.url,
        MARKETPLACE_STRICT_FIRST_ANSWER="true",
        **LOST_ANSWER_ENV,
    )
    doc = car.wait_for(lambda d: d["state"] != "registering", timeout=10)
    assert doc["state"] == "not_entitled" and doc["error"]["code"] == "FirstAnswerLost"
    time.sleep(0.5)
    assert len(emulator.calls) == 1


@pytest.mark.parametrize("strict", [False, True])
def test_sigkill_during_the_first_call_then_restart_with_the_same_state_dir(
    launch: Launch,
    emulator: Emulator,
    relay: Callable[..., SlowRelay],
    tmp_path: pathlib.Path,
    strict: bool,
) -> None:
    emulator.reconfigure({"entitled": False})
    slow = relay(30.0)
    pod = {"MARKETPLACE_STATE_DIR": str(tmp_path), "AWS_ACCESS_KEY_ID": "killed-pod"}
    first = launch(AWS_ENDPOINT_URL_MARKETPLACE_METERING=slow.url, **pod)
    assert slow.answer_held.wait(10)  # AWS has refused; the answer is still on the wire
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(5)
    strict_env = {"MARKETPLACE_STRICT_FIRST_ANSWER": "true"} if strict else {}
    second = launch(**pod, **strict_env)
    doc = second.wait_for(lambda d: d["state"] != "registering", timeout=10)
    if strict:
        assert doc["state"] == "not_entitled" and doc["error"]["code"] == "FirstAnswerLost"
        assert len(emulator.calls) == 1  # not one call more
    else:
        assert doc["state"] == "entitled"  # AWS's answer to the pod's second call
        assert any(w.startswith("first_answer_lost") for w in doc["warnings"])
        assert len(emulator.calls) == 2


def test_a_challenge_storm_with_aws_failing_stays_within_the_call_budget(
    launch: Launch, emulator: Emulator
) -> None:
    car = launch(MARKETPLACE_CHALLENGE_DEADLINE_SECONDS="2")
    car.wait_for(lambda d: d["state"] == "entitled")
    emulator.reconfigure({"faults": [{"error": "InternalServiceErrorException", "rate": 1.0}]})
    before = len(emulator.calls)
    storm_until = time.monotonic() + 3.0

    def storm() -> None:
        while time.monotonic() < storm_until:
            requests.post(car.api + "/v1/entitlement/challenge", json={"nonce": "s"}, timeout=10)

    threads = [threading.Thread(target=storm) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times = [c["at"] for c in emulator.calls[before:]]
    # Budget: burst 3, then 1/s, registrar included. Without it each admitted challenge
    # retried every ~0.1 s (test backoff) for its whole deadline.
    span = max(times) - min(times) if times else 0.0
    assert len(times) <= 3 + span * 1.0 + 1
    peak = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
    assert peak <= 4
