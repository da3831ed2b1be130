"""Configuration: one pydantic-settings class reading ``BUDGETER_*`` environment variables."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from budgeter.domain.passthrough import CLIENT_VERSION, check_version, parse_betas
from budgeter.domain.pricing import ModelPrice
from budgeter.store.urls import check_redis_url


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/budgeter`` (when absolute, as the XDG spec asks), else
    ``~/.local/share/budgeter``: one per user, whatever the current directory."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "budgeter"
    home = Path(os.path.expanduser("~"))
    if not home.is_absolute():  # no HOME and no passwd entry (a bare container user)
        home = Path(tempfile.gettempdir()) / f"budgeter-{os.getuid()}"
    return home / ".local" / "share" / "budgeter"


class SettingsError(ValueError):
    """A bad configuration value; the message is one line naming the variable."""


class AdminTokenSpec(BaseModel):
    """One named admin token of ``BUDGETER_ADMIN_TOKENS``: an admin writes, a viewer reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: SecretStr
    role: Literal["admin", "viewer"] = "admin"

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("each token must be at least 16 characters")
        return value


class Settings(BaseSettings):
    """Everything budgeter reads from its environment.

    Secrets are ``SecretStr`` so that they never show up in a repr, a log line or an answer.
    """

    model_config = SettingsConfigDict(
        env_prefix="BUDGETER_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    redis_url: str | None = Field(
        default=None, description="Redis URL; unset starts an embedded redis-server."
    )
    redis_cluster: bool = Field(
        default=False,
        description="Talk to a Redis Cluster (also implied by a redis+cluster:// URL).",
    )
    redis_wait_replicas: int = Field(
        default=0,
        ge=0,
        description="Replicas that must have each acknowledged write (Redis WAIT); 0: none.",
    )
    redis_wait_timeout_ms: int = Field(
        default=1000, ge=1, description="How long that WAIT may take before the write fails."
    )
    upstream_url: str = Field(
        default="http://127.0.0.1:8788",
        description="Base URL of the Messages API; /v1/messages is appended.",
    )
    upstream_api_key: SecretStr = Field(
        default=SecretStr("mock-key"), description="Key sent upstream as x-api-key."
    )
    upstream_anthropic_version: str = Field(
        default="2023-06-01",
        description="anthropic-version sent upstream; 'client' forwards the caller's.",
    )
    allowed_betas: Annotated[tuple[str, ...] | None, NoDecode] = Field(
        default=None,
        description="anthropic-beta values tenants may send (comma or JSON list); unset: any.",
    )
    admin_token: SecretStr | None = Field(
        default=None, description="Bearer token for /admin routes."
    )
    admin_tokens: dict[str, AdminTokenSpec] = Field(
        default_factory=dict,
        description='Named admin tokens, JSON {"name": {"token": "...", "role": '
        '"admin"|"viewer"}}; viewers only read. Beside BUDGETER_ADMIN_TOKEN (an admin).',
    )
    audit_retention_days: float = Field(
        default=400.0, gt=0, description="Audit log entries are trimmed after this long."
    )
    ledger_retention_days: float = Field(
        default=35.0, gt=0, description="Per-request ledger entries are trimmed after this long."
    )
    audit_max_entries: int = Field(
        default=100_000, ge=100, description="At most this many audit log entries are kept."
    )
    webhook_url: str | None = Field(
        default=None,
        description="Where notification events are POSTed (unset: none are delivered).",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="Signs each event (budgeter-signature: t=...,v1=HMAC-SHA256 hex).",
    )
    webhook_format: Literal["json", "slack"] = Field(
        default="json", description="'json' events, or 'slack': {\"text\": ...} messages."
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL clients reach budgeter at (results_url); else the request's host.",
    )
    batch_ttl_hours: float = Field(
        default=24.0, gt=0, description="Time a batch's requests may wait before they expire."
    )
    results_retention_days: float = Field(
        default=29.0,
        gt=0,
        description="Batches and their results are deleted this long after creation.",
    )
    api_max_body_mb: int = Field(
        default=256, ge=1, description="Largest request body the API accepts (MB)."
    )
    api_redis_deadline_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How long an API request waits for a Redis reply before it answers 503 "
        "(batch creation: longer, with the batch's size).",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where the shared embedded Redis keeps its data (never the current "
        "directory by default: $XDG_DATA_HOME/budgeter, else ~/.local/share/budgeter).",
    )
    key_prefix: str = Field(default="budgeter", description="Prefix of every Redis key.")
    lease_seconds: float = Field(
        default=60.0, gt=0, description="Visibility timeout of a job taken by a worker."
    )
    max_attempts: int = Field(
        default=5, ge=1, description="Attempts before a job is dead-lettered."
    )
    reservation_grace_seconds: float = Field(
        default=30.0, gt=0, description="Extra time past the lease before the reaper acts."
    )
    upstream_timeout_seconds: float = Field(
        default=600.0, gt=0, description="Timeout of one /v1/messages call."
    )
    upstream_max_attempts: int = Field(
        default=5, ge=1, description="HTTP attempts per upstream call (retries + 1)."
    )
    count_cache_ttl_seconds: int = Field(
        default=3600, ge=0, description="TTL of cached count_tokens answers (0: no cache)."
    )
    maintenance_seconds: float = Field(
        default=5.0, gt=0, description="How often a worker reclaims leases and reaps."
    )
    drain_seconds: float = Field(
        default=30.0, ge=0, description="How long SIGTERM waits for in-flight jobs."
    )
    prices: dict[str, ModelPrice] = Field(
        default_factory=dict,
        description=(
            "USD per million tokens per model (JSON), over genai-prices' table; "
            "'*' prices any other model."
        ),
    )
    redis_max_connections: int = Field(
        default=512,
        ge=1,
        description="Redis connections per process; callers wait for a free one.",
    )
    upstream_max_connections: int = Field(
        default=1000,
        ge=1,
        description="HTTP connections to the upstream per process (calls in flight).",
    )
    auth_failures_per_minute: int = Field(
        default=20,
        ge=1,
        description="Failed authentications a client address may make per minute before 429.",
    )
    trust_forwarded_for: bool = Field(
        default=False,
        description="Take the client address from X-Forwarded-For (behind a trusted proxy).",
    )
    metrics_max_tenants: int = Field(
        default=50, ge=1, description="Tenant label values before the rest become 'other'."
    )
    log_format: str = Field(default="text", description="'text' or 'json' log lines.")
    log_level: str = Field(default="INFO", description="Python logging level.")
    event_loop: str = Field(
        default="auto",
        description="'auto' (uvloop when installed), 'uvloop' or 'asyncio' (the default loop).",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        return check_redis_url(value)  # the URL forms: budgeter/store/urls.py

    @property
    def cluster_mode(self) -> bool:
        return self.redis_cluster or (self.redis_url or "").startswith("redis+cluster://")

    @field_validator("upstream_url")
    @classmethod
    def _http_scheme(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("upstream_anthropic_version")
    @classmethod
    def _version(cls, value: str) -> str:
        return value if value == CLIENT_VERSION else check_version(value)

    @field_validator("allowed_betas", mode="before")
    @classmethod
    def _betas_list(cls, value: object) -> tuple[str, ...] | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not a JSON list: {exc}") from None
        if isinstance(value, str):
            return parse_betas([value])
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError("must be a comma list or a JSON list of beta names")
        return parse_betas(value)

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        return None if value in ("", None) else value

    @field_validator("public_url")
    @classmethod
    def _public_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value not in ("text", "json"):
            raise ValueError("must be 'text' or 'json'")
        return value

    @field_validator("event_loop")
    @classmethod
    def _event_loop(cls, value: str) -> str:
        value = value.lower()
        if value not in ("auto", "uvloop", "asyncio"):
            raise ValueError("must be 'auto', 'uvloop' or 'asyncio'")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        value = value.upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning a validation error into a one-line :class:`SettingsError`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        variable = f"BUDGETER_{field.upper()}"
        raise SettingsError(f"{variable}: {first['msg']}") from None
