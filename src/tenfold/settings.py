"""One Settings object: `TENFOLD_*` environment variables, then `tenfold.toml`, then defaults."""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tenfold import SERVICES

Csv = Annotated[list[str], NoDecode]


class SettingsError(Exception):
    """The configuration is invalid; the message names the variable and the expected form."""


DEFAULT_CONFIG_FILE = "tenfold.toml"
SECRET_KEY_BYTES = 32
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
NEW_MASTER_KEY_COMMAND = (
    'python -c "import secrets,base64;'
    'print(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())"'
)


def decode_secret_key(text: str) -> bytes:
    """The 32 bytes of a master key written as urlsafe base64 (padding optional)."""
    digits = text.strip().rstrip("=")
    raw: bytes | None = None
    if _BASE64URL.fullmatch(digits):
        with contextlib.suppress(binascii.Error):
            raw = base64.urlsafe_b64decode(digits + "=" * (-len(digits) % 4))
    if raw is None or len(raw) != SECRET_KEY_BYTES:
        found = "is not urlsafe base64" if raw is None else f"decodes to {len(raw)} bytes"
        raise ValueError(
            f"{found}; expected the urlsafe base64 of {SECRET_KEY_BYTES} random bytes, "
            f"generated with: {NEW_MASTER_KEY_COMMAND}"
        )
    return raw


def config_file() -> Path:
    """The TOML file settings are read from: `TENFOLD_CONFIG`, else ./tenfold.toml if present."""
    return Path(os.environ.get("TENFOLD_CONFIG") or DEFAULT_CONFIG_FILE)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TENFOLD_",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Path(".tenfold")
    database_url: str = ""  # empty: SQLite file in data_dir
    redis_url: str = ""  # empty: in-process memory backends
    redis_prefix: str = "tf"
    services: Csv = Field(default_factory=lambda: list(SERVICES))

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    # The HTTP server `tenfold serve` runs: uvicorn, or granian (the `granian` extra), whose
    # Rust I/O serves tenfold's hot routes 10-20% faster on the same process.
    server: Literal["uvicorn", "granian"] = "uvicorn"
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)  # 1 MiB
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    auto_migrate: bool | None = None  # None: migrate on serve in embedded mode only
    create_admin_key: bool = True
    gc_freeze: bool = True  # move start-up objects out of the cyclic collector's way

    # Rate limiting of tenfold's own API.
    ratelimit_guard: bool = True
    ratelimit_anonymous_limit: int = Field(default=60, ge=1)  # per IP, per window
    ratelimit_anonymous_window: int = Field(default=60, ge=1, le=86_400)  # seconds
    ratelimit_limit_public: bool = False  # also limit redirects and health checks
    ratelimit_trusted_proxies: Csv = Field(default_factory=list)
    ratelimit_legacy_headers: bool = False
    ratelimit_replicas: int = Field(default=1, ge=1)  # for the `local` Redis-outage mode
    ratelimit_events_sample: float = Field(default=0.01, ge=0.0, le=1.0)

    # Task queue: `tenfold serve` also runs these tasks in-process (empty: no embedded worker).
    tasks_app: str = ""  # module:registry
    tasks_concurrency: int = Field(default=4, ge=1, le=256)
    tasks_service_worker: bool = True  # run tenfold's own services' tasks and schedules here

    # Sessions (see docs/sessions.md). Per-type policies override the defaults field by field:
    # {"web": {"idle_timeout": 900, "max_sessions": 3, "on_limit": "deny"}}.
    sessions_policies: dict[str, dict[str, Any]] = Field(default_factory=dict)
    sessions_grace_seconds: float = Field(default=10.0, ge=0, le=300)
    sessions_max_data_bytes: int = Field(default=16 * 1024, ge=256, le=1024 * 1024)
    sessions_access_tokens: bool = False  # also issue signed JWT access tokens
    sessions_access_token_ttl: int = Field(default=300, ge=10, le=86_400)
    sessions_risk_network: Literal["allow", "step_up_required", "revoke"] = "allow"
    sessions_risk_country: Literal["allow", "step_up_required", "revoke"] = "step_up_required"
    sessions_risk_fingerprint: Literal["allow", "step_up_required", "revoke"] = "revoke"
    geoip_db: str = ""  # a MaxMind-format (.mmdb) database: countries for risk and analytics

    # URL shortener (see docs/shortener.md).
    shortener_code_length: int = Field(default=7, ge=5, le=10)
    shortener_base_url: str = ""  # the default domain's origin; empty: the request's own
    shortener_hosts: Csv = Field(default_factory=list)  # hosts serving GET /{code}
    shortener_anonymous: bool = False  # let calls without an API key create links
    shortener_blocklist: Csv = Field(default_factory=list)  # domains, or globs over the URL
    shortener_blocklist_cron: str = "17 * * * *"  # when every link is checked again
    shortener_plans: dict[str, dict[str, Any]] = Field(default_factory=dict)
    shortener_cache_size: int = Field(default=100_000, ge=0)
    shortener_retention_days: int = Field(default=1_826, ge=0)  # 5 years; 0 keeps links forever
    shortener_analytics: bool = True  # record clicks
    shortener_click_buffer: int = Field(default=100_000, ge=100)  # clicks waiting, at most
    shortener_count_bots: bool = False  # count bot clicks in totals
    shortener_raw_clicks: bool = True  # keep every distinct click, not only the roll-ups
    shortener_analytics_process: bool = True  # enrich and store clicks in a child process
    shortener_domain_verify_url: str = (
        "https://{domain}/.well-known/tenfold-domain-verification"  # must answer the token
    )
    shortener_domain_verify_methods: Csv = Field(default_factory=lambda: ["http", "dns"])
    shortener_dns_nameservers: Csv = Field(default_factory=list)  # empty: the system resolver
    flags_default_environment: str = "production"  # where keys bound to none evaluate
    flags_stream_max_seconds: float = Field(default=300.0, ge=0)  # then SDKs reconnect

    # Analytics store: empty = DuckDB in data_dir embedded, the SQL database at scale.
    analytics_url: str = ""

    # The master key sealing the data keys of tenfold.kernel.crypto (urlsafe base64, 32 bytes).
    # Unset: embedded mode keeps one in <data dir>/secret.key; scale-out requires it.
    secret_key: SecretStr | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file())
        return (init_settings, env_settings, toml)

    @field_validator(
        "services",
        "ratelimit_trusted_proxies",
        "shortener_hosts",
        "shortener_blocklist",
        "shortener_domain_verify_methods",
        "shortener_dns_nameservers",
        mode="before",
    )
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("services")
    @classmethod
    def _known_services(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in SERVICES]
        if unknown:
            raise ValueError(
                f"unknown service {unknown[0]!r}; expected a comma-separated list of: "
                + ", ".join(SERVICES)
            )
        if not value:
            raise ValueError("no service named; expected at least one of: " + ", ".join(SERVICES))
        return value

    @field_validator("sessions_policies")
    @classmethod
    def _session_policies(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        numbers = {
            "idle_timeout",
            "absolute_lifetime",
            "remember_me_lifetime",
            "remember_me_idle_timeout",
            "max_sessions",
        }
        known = numbers | {"allow_remember_me", "on_limit"}
        for kind, fields in value.items():
            if kind not in ("web", "mobile", "api"):
                raise ValueError(f"unknown session type {kind!r}; expected web, mobile or api")
            for name, item in fields.items():
                if name not in known:
                    raise ValueError(f"{kind}.{name}: unknown; expected one of {sorted(known)}")
                if name in numbers and (
                    not isinstance(item, int) or isinstance(item, bool) or item < 0
                ):
                    raise ValueError(f"{kind}.{name}: expected a whole number of seconds >= 0")
                if name == "on_limit" and item not in ("evict_oldest", "deny"):
                    raise ValueError(f"{kind}.on_limit: expected evict_oldest or deny")
                if name == "allow_remember_me" and not isinstance(item, bool):
                    raise ValueError(f"{kind}.allow_remember_me: expected true or false")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql", "postgres")):
            raise ValueError("expected sqlite:///path or postgresql://user@host:port/db")
        return value

    @field_validator("secret_key", mode="before")
    @classmethod
    def _secret_key(cls, value: Any) -> Any:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str):
            if not value.strip():
                return None
            decode_secret_key(value)
            return value.strip()
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://host:port/db (or leave unset for memory)")
        return value

    @field_validator("ratelimit_trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP network; expected e.g. 10.0.0.0/8,127.0.0.1"
                ) from None
        return value

    @model_validator(mode="after")
    def _workers_share_counters(self) -> Settings:
        if self.workers > 1 and not self.redis_url:
            raise ValueError(
                "workers: more than one worker needs TENFOLD_REDIS_URL so counters are shared; "
                "expected 1 or a Redis URL"
            )
        return self

    @model_validator(mode="after")
    def _default_database(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'tenfold.db').as_posix()}"
        return self

    @model_validator(mode="after")
    def _workers_share_analytics(self) -> Settings:
        """DuckDB is one process's file (or its memory): several server processes cannot all
        write click analytics to it, so say so at start rather than lose their clicks."""
        if self.workers < 2 or "shortener" not in self.services or not self.shortener_analytics:
            return self
        if self.analytics_store_url.lower().startswith("duckdb"):
            raise ValueError(
                "workers: more than one worker cannot share the DuckDB click analytics; "
                "set TENFOLD_ANALYTICS_URL to a PostgreSQL URL, or TENFOLD_SHORTENER_ANALYTICS="
                "false, or serve with one worker"
            )
        return self

    @property
    def embedded(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def analytics_store_url(self) -> str:
        """The analytics store: as configured; else DuckDB beside SQLite, the SQL database at
        scale."""
        if self.analytics_url:
            return self.analytics_url
        if self.embedded:
            return f"duckdb:///{(self.data_dir / 'analytics.duckdb').as_posix()}"
        return self.database_url

    @property
    def should_migrate_on_serve(self) -> bool:
        return self.embedded if self.auto_migrate is None else self.auto_migrate


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning validation errors into one readable line."""
    path = config_file()
    if os.environ.get("TENFOLD_CONFIG") and not path.is_file():
        raise SettingsError(f"TENFOLD_CONFIG: {path} is not a file; expected a path to a TOML file")
    try:
        return Settings(**overrides)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"TENFOLD_CONFIG: {path} is not valid TOML ({exc})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "settings"
        if err["type"] == "extra_forbidden":
            raise SettingsError(
                f"TENFOLD_CONFIG: {path} has an unknown setting {field!r}"
            ) from None
        message = str(err["msg"]).removeprefix("Value error, ")
        if not err["loc"]:  # a rule across fields names its field as "field: message"
            field, _, message = message.partition(": ")
        raise SettingsError(f"TENFOLD_{field.upper()}: {message}") from None
