"""Configuration: defaults, TOML, env overrides, one test per validation rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.agent.config import Config, load_config
from bridge.wire.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "midbridge.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    config = load_config(None, environ={})
    assert config.broker.port == 1883
    assert config.limits.max_in_flight == 1000
    assert config.bridge.agent_id == "mid.server.midbridge"


def test_toml_and_env_override(tmp_path: Path) -> None:
    path = write(tmp_path, '[broker]\nhost = "b.lan"\nport = 8883\n[bridge]\nagent = "dc1"\n')
    config = load_config(
        path,
        environ={"MIDBRIDGE_BROKER__PORT": "1884", "MIDBRIDGE_LIMITS__LANE_WORKERS": "[1, 2, 3]"},
    )
    assert config.broker.host == "b.lan"
    assert config.broker.port == 1884
    assert config.bridge.agent == "dc1"
    assert config.limits.lane_workers == (1, 2, 3)


@pytest.mark.parametrize(
    ("text", "env", "field"),
    [
        ("[broker]\nhots = 'x'\n", {}, "broker.hots"),
        ("[nonsense]\na = 1\n", {}, "nonsense"),
        ("[broker]\nport = 70000\n", {}, "broker.port"),
        ("[bridge]\nagent = 'has space'\n", {}, "bridge.agent"),
        ("[limits]\nmax_in_flight = 0\n", {}, "limits.max_in_flight"),
        ("[limits]\nlane_workers = [1, 0, 1]\n", {}, "limits"),
        ("[probes.shazzam]\nmax_addresses = 0\n", {}, "probes.shazzam.max_addresses"),
        ("", {"MIDBRIDGE_LIMITS__PER_HOST": "-1"}, "limits.per_host"),
        ("", {"MIDBRIDGE_BROKER__NOPE": "1"}, "broker.nope"),
    ],
)
def test_invalid_config_names_the_key(
    tmp_path: Path, text: str, env: dict[str, str], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ=env)
    assert info.value.field is not None
    assert info.value.field.split(" (")[0] == field
    for variable in env:  # a value from the environment names its variable
        assert f"(environment variable {variable})" in info.value.field


def test_every_problem_at_once_with_the_variables_named(tmp_path: Path) -> None:
    text = "[broker]\nport = 70000\nhots = 'x'\n[limits]\nmax_in_flight = 0\n"
    env = {"MIDBRIDGE_LIMITS__PER_HOST": "-1", "MIDBRIDGE_LOG_LEVEL": "loud"}
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ=env)
    problems = info.value.problems
    assert len(problems) == 5, problems
    assert any(p.startswith("broker.port: ") for p in problems)
    assert "broker.hots: unknown key" in problems
    assert any(p.startswith("limits.max_in_flight: ") for p in problems)
    assert any(
        p.startswith("limits.per_host (environment variable MIDBRIDGE_LIMITS__PER_HOST): ")
        for p in problems
    )
    assert any(
        p.startswith("log_level (environment variable MIDBRIDGE_LOG_LEVEL): ") for p in problems
    )
    assert "\n" not in str(info.value)  # one line, every problem in it


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, environ={})
    assert str(info.value) == f"{tmp_path}: is a directory, not a TOML file"


def test_the_defaults_as_toml_load_back_as_the_defaults(tmp_path: Path) -> None:
    import tomllib

    from bridge.agent.config import defaults_toml

    text = defaults_toml()
    assert tomllib.loads(text)["limits"]["lane_workers"] == [20, 50, 100]
    assert load_config(write(tmp_path, text), environ={}) == Config()


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TOML"):
        load_config(write(tmp_path, "[broker\n"), environ={})


def test_shipped_example_config_parses() -> None:
    config = load_config(REPO / "compose" / "midbridge.toml", environ={})
    assert isinstance(config, Config)
    assert config.broker.host == "mosquitto"


def test_hardened_example_config_parses() -> None:
    config = load_config(REPO / "compose" / "midbridge-hardened.toml", environ={})
    assert config.security.require_signatures
    assert config.security.require_validation
    assert config.broker.tls


def test_signatures_without_a_platform_key_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[security]\nrequire_signatures = true\n"), environ={})
    assert info.value.field == "security"
    assert "platform_key" in str(info.value)


def test_other_commands_variables_are_left_alone() -> None:
    config = load_config(
        None,
        environ={
            "MIDBRIDGE_ADMIN_PASSWORD": "x",
            "MIDBRIDGE_INSTANCE_BROKER_PASSWORD": "y",
            "MIDBRIDGE_LOG_LEVEL": "debug",
        },
    )
    assert config.log_level == "debug"
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"MIDBRIDGE_NOSUCH__KEY": "1"})
    assert info.value.field == "nosuch (environment variable MIDBRIDGE_NOSUCH__KEY)"


def test_session_users_without_a_broker_user_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[broker]\nsession_users = true\n"), environ={})
    assert info.value.field == "broker"
    assert "username" in str(info.value)


def test_signatures_need_a_dedupe_window_longer_than_twice_the_clock_skew(
    tmp_path: Path,
) -> None:
    key = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
    text = (
        f'[security]\nrequire_signatures = true\nplatform_key = "{key}"\nclock_skew = 60\n'
        "[limits]\ndedupe_window = 120\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert "limits.dedupe_window" in str(info.value)
    config = load_config(write(tmp_path, text.replace("= 120", "= 121")), environ={})
    assert config.signature_max_age == 1.0


def test_probe_settings_from_the_environment_reach_the_probe(tmp_path: Path) -> None:
    """Environment variables arrive lower cased (``snmp``); they still set the SNMP probe's
    settings, over the file's table spelt as the topic."""
    from bridge.agent.probe_contexts import validate_all_settings
    from probes import REGISTRY

    path = tmp_path / "midbridge.toml"
    path.write_text("[probes.settings.SNMP]\nmax_in_flight = 50\nretries = 3\n")
    environ = {"MIDBRIDGE_PROBES__SETTINGS__SNMP__MAX_IN_FLIGHT": "100"}
    settings = validate_all_settings(load_config(path, environ=environ), REGISTRY)
    assert settings["SNMP"].max_in_flight == 100  # type: ignore[attr-defined]
    assert settings["SNMP"].retries == 3  # type: ignore[attr-defined]
    environ = {"MIDBRIDGE_PROBES__SETTINGS__RESTPROBE__MAX_IN_FLIGHT": "7"}
    settings = validate_all_settings(load_config(None, environ=environ), REGISTRY)
    assert settings["RESTProbe"].max_in_flight == 7  # type: ignore[attr-defined]
