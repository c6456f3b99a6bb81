"""Settings: environment, tenfold.toml, defaults, and one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tenfold import SERVICES
from tenfold.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No TENFOLD_* variable from the outer shell, and a working directory without a toml."""
    for name in list(os.environ):
        if name.startswith("TENFOLD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    path.write_text(text)
    monkeypatch.setenv("TENFOLD_CONFIG", str(path))
    return path


def one_line_error(**overrides: object) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(**overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_defaults_are_the_embedded_stack(clean_env: Path) -> None:
    settings = load_settings()
    assert settings.data_dir == Path(".tenfold")
    assert settings.database_url == "sqlite:///.tenfold/tenfold.db"
    assert settings.redis_url == ""
    assert settings.services == list(SERVICES)
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.embedded is True
    assert settings.should_migrate_on_serve is True


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENFOLD_DATA_DIR", "/srv/tenfold")
    monkeypatch.setenv("TENFOLD_DATABASE_URL", "postgresql://app@db:5432/tenfold")
    monkeypatch.setenv("TENFOLD_REDIS_URL", "redis://cache:6379/1")
    monkeypatch.setenv("TENFOLD_PORT", "9000")
    settings = load_settings()
    assert settings.data_dir == Path("/srv/tenfold")
    assert settings.database_url == "postgresql://app@db:5432/tenfold"
    assert settings.redis_url == "redis://cache:6379/1"
    assert settings.port == 9000
    assert settings.embedded is False
    assert settings.should_migrate_on_serve is False


def test_database_defaults_into_the_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENFOLD_DATA_DIR", "/var/lib/tf")
    assert load_settings().database_url == "sqlite:////var/lib/tf/tenfold.db"


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [("ratelimit", ["ratelimit"]), (" ratelimit , ", ["ratelimit"]), ("ratelimit,", ["ratelimit"])],
)
def test_services_are_comma_separated(
    monkeypatch: pytest.MonkeyPatch, raw: str, parsed: list[str]
) -> None:
    monkeypatch.setenv("TENFOLD_SERVICES", raw)
    assert load_settings().services == parsed


def test_trusted_proxies_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENFOLD_RATELIMIT_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1,::1")
    assert load_settings().ratelimit_trusted_proxies == ["10.0.0.0/8", "127.0.0.1", "::1"]


def test_toml_file_named_by_tenfold_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    write_config(
        tmp_path / "conf" / "custom.toml",
        'port = 8123\nservices = ["ratelimit"]\nredis_url = "redis://r:6379/0"\n'
        'ratelimit_trusted_proxies = "10.0.0.0/8"\n',
        monkeypatch,
    )
    settings = load_settings()
    assert settings.port == 8123
    assert settings.services == ["ratelimit"]
    assert settings.redis_url == "redis://r:6379/0"
    assert settings.ratelimit_trusted_proxies == ["10.0.0.0/8"]


def test_tenfold_toml_in_the_working_directory_is_read(clean_env: Path) -> None:
    (clean_env / "tenfold.toml").write_text("port = 8124\n")
    assert load_settings().port == 8124


def test_environment_beats_toml_and_arguments_beat_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(
        tmp_path / "t.toml", "port = 8001\nlog_level = 'debug'\nhost = '0.0.0.0'\n", monkeypatch
    )
    monkeypatch.setenv("TENFOLD_PORT", "8002")
    monkeypatch.setenv("TENFOLD_LOG_LEVEL", "warning")
    settings = load_settings(log_level="error")
    assert (settings.host, settings.port, settings.log_level) == ("0.0.0.0", 8002, "error")


def test_unknown_service_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TENFOLD_SERVICES", "ratelimit,nope")
    message = one_line_error()
    assert message.startswith("TENFOLD_SERVICES: unknown service 'nope'")
    assert "ratelimit" in message.split("expected", 1)[1]


def test_no_service_at_all_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENFOLD_SERVICES", " , ")
    assert one_line_error().startswith("TENFOLD_SERVICES: no service named")


@pytest.mark.parametrize("port", ["0", "65536", "http", "-1"])
def test_bad_port_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, port: str
) -> None:
    monkeypatch.setenv("TENFOLD_PORT", port)
    assert one_line_error().startswith("TENFOLD_PORT: ")


@pytest.mark.parametrize("url", ["mysql://u@h/db", "http://db", "tenfold.db"])
def test_bad_database_scheme_is_one_line_with_the_expected_form(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("TENFOLD_DATABASE_URL", url)
    message = one_line_error()
    assert message.startswith("TENFOLD_DATABASE_URL: expected sqlite:///")
    assert "postgresql://" in message


def test_bad_redis_scheme_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENFOLD_REDIS_URL", "localhost:6379")
    assert one_line_error().startswith("TENFOLD_REDIS_URL: expected redis://")


@pytest.mark.parametrize("proxies", ["10.0.0.0/8,proxy.local", "300.1.1.1", "10.0.0.0/33"])
def test_bad_trusted_proxy_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, proxies: str
) -> None:
    monkeypatch.setenv("TENFOLD_RATELIMIT_TRUSTED_PROXIES", proxies)
    message = one_line_error()
    assert message.startswith("TENFOLD_RATELIMIT_TRUSTED_PROXIES: ")
    assert "is not an IP network; expected e.g. 10.0.0.0/8" in message


def test_bad_value_in_toml_is_one_line_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path / "t.toml", "max_body_bytes = 10\n", monkeypatch)
    assert one_line_error().startswith("TENFOLD_MAX_BODY_BYTES: ")


def test_unknown_setting_in_toml_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "t.toml", "prot = 8000\n", monkeypatch)
    assert one_line_error() == f"TENFOLD_CONFIG: {path} has an unknown setting 'prot'"


def test_invalid_toml_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path / "t.toml", "port = = 1\n", monkeypatch)
    assert one_line_error().startswith(f"TENFOLD_CONFIG: {path} is not valid TOML")


def test_missing_config_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENFOLD_CONFIG", str(tmp_path / "absent.toml"))
    assert "absent.toml is not a file" in one_line_error()


def test_settings_without_load_settings_still_validate() -> None:
    with pytest.raises(ValueError, match="unknown service"):
        Settings(services=["nope"])


def test_several_workers_without_redis_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENFOLD_WORKERS", "4")
    assert one_line_error().startswith("TENFOLD_WORKERS: more than one worker needs")
    monkeypatch.setenv("TENFOLD_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("TENFOLD_SHORTENER_ANALYTICS", "false")
    assert load_settings().workers == 4


def test_several_workers_cannot_share_duckdb_click_analytics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TENFOLD_WORKERS", "2")
    monkeypatch.setenv("TENFOLD_REDIS_URL", "redis://127.0.0.1:6379/0")
    assert one_line_error().startswith(
        "TENFOLD_WORKERS: more than one worker cannot share the DuckDB click analytics"
    )
    monkeypatch.setenv("TENFOLD_ANALYTICS_URL", "duckdb:")  # each process its own: no better
    assert "cannot share the DuckDB" in one_line_error()
    monkeypatch.setenv("TENFOLD_ANALYTICS_URL", "postgresql://127.0.0.1:5432/test")
    assert load_settings().workers == 2
    monkeypatch.delenv("TENFOLD_ANALYTICS_URL")
    monkeypatch.setenv("TENFOLD_DATABASE_URL", "postgresql+asyncpg://127.0.0.1:5432/test")
    assert load_settings().workers == 2  # at scale the analytics live in that database
    monkeypatch.setenv("TENFOLD_DATABASE_URL", "sqlite:///x.db")
    monkeypatch.setenv("TENFOLD_SERVICES", "ratelimit,sessions")
    assert load_settings().workers == 2  # no shortener, no click analytics
