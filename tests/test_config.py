"""Configuration rules a seller meets in the first hour, checked on `config.load` in-process."""

from __future__ import annotations

import pytest

from sidecar import config
from sidecar.config import SPECS, ConfigError, is_loopback, unknown_variables, variables
from tests.helpers import new_key, pem


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A clean MARKETPLACE_* environment with a valid product code and key."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("MARKETPLACE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MARKETPLACE_PRODUCT_CODE", "prod-abc")
    monkeypatch.setenv("MARKETPLACE_PUBLIC_KEY", pem(new_key()))
    return monkeypatch


def problems(env: pytest.MonkeyPatch) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config.load()
    return exc.value.problems


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),  # all of 127/8 is loopback
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped loopback on an IPv6 socket
        ("localhost", True),
        ("LOCALHOST", True),
        ("localhost.", True),
        ("0.0.0.0", False),  # noqa: S104 - the wildcard is the case under test
        ("::", False),
        ("", False),  # `[]:8787` binds the wildcard
        ("10.1.2.3", False),
        ("::ffff:10.1.2.3", False),
        ("fe80::1%lo", False),
        ("myhost", False),  # a name could resolve anywhere when the socket binds
        ("127.1", False),  # a name to us, though the resolver reads it as 127.0.0.1
        ("localhost.example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:8787", "[::]:8787", "10.1.2.3:8787", "myhost:8787", "[]:8787"]
)
def test_non_loopback_listen_needs_the_opt_in(env: pytest.MonkeyPatch, listen: str) -> None:
    env.setenv("MARKETPLACE_LISTEN", listen)
    found = problems(env)
    assert len(found) == 1, found
    assert found[0].startswith(f"MARKETPLACE_LISTEN: {listen} is not a loopback address")
    assert "MARKETPLACE_LISTEN_ALLOW_NON_LOOPBACK=true" in found[0]
    env.setenv("MARKETPLACE_LISTEN_ALLOW_NON_LOOPBACK", "true")
    settings, _ = config.load()
    warnings = config.config_warnings(settings)
    assert len(warnings) == 1 and warnings[0].startswith(f"MARKETPLACE_LISTEN={listen} is not")


@pytest.mark.parametrize("listen", ["127.0.0.1:8787", "[::1]:8787", "localhost:8787"])
def test_loopback_listen_needs_no_opt_in_and_warns_nothing(
    env: pytest.MonkeyPatch, listen: str
) -> None:
    env.setenv("MARKETPLACE_LISTEN", listen)
    settings, _ = config.load()
    assert config.config_warnings(settings) == []


def test_a_misspelled_key_variable_is_named_not_reported_as_a_missing_key(
    env: pytest.MonkeyPatch,
) -> None:
    env.delenv("MARKETPLACE_PUBLIC_KEY")
    env.setenv("MARKETPLACE_PUBLICKEY_FILE", "/etc/marketplace/public-key.pem")
    assert problems(env) == [
        "MARKETPLACE_PUBLICKEY_FILE: unknown variable; did you mean MARKETPLACE_PUBLIC_KEY_FILE?"
    ]


def test_unknown_variables_are_listed_with_the_other_problems(env: pytest.MonkeyPatch) -> None:
    env.setenv("MARKETPLACE_LISTEN_ALLOW_NONLOOPBACK", "true")
    env.setenv("marketplace_clock_skew_second", "30")  # pydantic-settings ignores case
    env.setenv("MARKETPLACE_TOTALLY_NEW", "1")
    env.setenv("MARKETPLACE_REGISTER_JITTER", "9")
    assert problems(env) == [
        "MARKETPLACE_LISTEN_ALLOW_NONLOOPBACK: unknown variable; "
        "did you mean MARKETPLACE_LISTEN_ALLOW_NON_LOOPBACK?",
        "MARKETPLACE_TOTALLY_NEW: unknown variable "
        "(marketplace-sidecar run --help lists the settings)",
        "marketplace_clock_skew_second: unknown variable; "
        "did you mean MARKETPLACE_CLOCK_SKEW_SECONDS?",
        "MARKETPLACE_REGISTER_JITTER: Input should be less than or equal to 0.5 (got '9')",
    ]


def test_a_misspelling_does_not_hide_a_problem_of_the_variable_that_is_set(
    env: pytest.MonkeyPatch,
) -> None:
    env.delenv("MARKETPLACE_PUBLIC_KEY")
    env.setenv("MARKETPLACE_PUBLIC_KEY_FILE", "/nonexistent.pem")
    env.setenv("MARKETPLACE_PUBLICKEY_FILE", "/k.pem")
    found = problems(env)
    assert found[0].startswith("MARKETPLACE_PUBLICKEY_FILE: unknown variable")
    assert found[1].startswith("MARKETPLACE_PUBLIC_KEY_FILE: cannot read /nonexistent.pem")


def test_every_settings_field_is_a_known_variable_and_nothing_else_is() -> None:
    names = {f"MARKETPLACE_{n.upper()}" for n in SPECS}
    assert set(variables()) == names
    assert unknown_variables(dict.fromkeys(names, "x")) == {}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # What kubelet injects for Services named "marketplace" and "marketplace-sidecar".
        ("MARKETPLACE_SERVICE_HOST", "10.96.0.12"),
        ("MARKETPLACE_SERVICE_PORT", "8788"),
        ("MARKETPLACE_SIDECAR_SERVICE_PORT_MP_PROBE", "8788"),
        ("MARKETPLACE_PORT", "tcp://10.96.0.12:8788"),
        ("MARKETPLACE_SIDECAR_PORT_8788_TCP", "tcp://10.96.0.12:8788"),
        ("MARKETPLACE_SIDECAR_PORT_8788_TCP_PROTO", "tcp"),
        ("MARKETPLACE_SIDECAR_PORT_8788_TCP_PORT", "8788"),
        ("MARKETPLACE_SIDECAR_PORT_8788_TCP_ADDR", "fd00::12"),
        # Read by the product container; the project's manifests set it there.
        ("MARKETPLACE_SIDECAR_URL", "http://127.0.0.1:8787"),
    ],
)
def test_kubernetes_service_links_and_the_product_side_url_are_not_unknown(
    name: str, value: str
) -> None:
    assert unknown_variables({name: value}) == {}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # A name shaped like a service link but a value that is not one: a guessed setting.
        ("MARKETPLACE_PROBE_PORT", "8788"),
        ("MARKETPLACE_SERVICE_HOST", "my-host"),
        ("MARKETPLACE_PORT", "8787"),
    ],
)
def test_look_alikes_of_service_links_are_still_unknown(name: str, value: str) -> None:
    assert list(unknown_variables({name: value})) == [name]
    if name == "MARKETPLACE_PROBE_PORT":
        assert unknown_variables({name: value})[name] == "MARKETPLACE_PROBE_LISTEN"


def test_public_key_accepts_literal_backslash_n(env: pytest.MonkeyPatch) -> None:
    key = new_key()
    one_line = pem(key).strip().replace("\n", "\\n")
    assert "\n" not in one_line
    env.setenv("MARKETPLACE_PUBLIC_KEY", one_line)
    _, keys = config.load()
    assert keys[1].public_numbers() == key.public_key().public_numbers()
