"""Settings for a bus, read from arguments and ``HIVEBUS_`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DAY = 24 * 60 * 60

MemoryPolicyAction = Literal["warn", "refuse", "ignore"]


class Settings(BaseSettings):
    """Every tunable of a bus; each field is also read from ``HIVEBUS_<NAME>``.

    Arguments win over environment variables, which win over the defaults.
    """

    # hide_input_in_errors: a rejected redis_url may carry a password.
    model_config = SettingsConfigDict(
        env_prefix="HIVEBUS_", extra="forbid", hide_input_in_errors=True
    )

    redis_url: str = Field(
        default="memory://",
        description="redis://, rediss:// (TLS) or memory:// (in-process fakeredis)",
    )
    prefix: str = Field(
        default="hivebus",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="namespace put in front of every Redis key",
    )
    service: str = Field(
        default="hivebus",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="name of this service: the event source and default group",
    )
    consumer_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,100}$",
        description="consumer name in every group; unique per process by default",
    )
    event_ttl: float = Field(
        default=DAY, gt=0, description="seconds a stored event is kept"
    )
    stream_retention: float = Field(
        default=DAY,
        gt=0,
        description="seconds a stream entry is kept before age trimming",
    )
    dlq_retention: float = Field(
        default=7 * DAY, gt=0, description="seconds a dead-letter entry is kept"
    )
    max_event_bytes: int = Field(
        default=1024 * 1024, gt=0, description="largest encoded event, in bytes"
    )
    publish_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds a publish keeps retrying while Redis is unreachable",
    )
    max_connections: int = Field(
        default=50, ge=4, description="size of the command connection pool"
    )
    socket_timeout: float = Field(
        default=5.0, gt=0, description="seconds to wait for a command reply"
    )
    health_check_interval: float = Field(
        default=15.0, ge=0, description="seconds between idle connection pings"
    )
    maxmemory_policy_action: MemoryPolicyAction = Field(
        default="warn",
        description="what to do when Redis may evict keys: warn, refuse or ignore",
    )
    tls_ca_certs: str | None = Field(
        default=None, description="CA bundle for rediss:// URLs"
    )
    tls_certfile: str | None = Field(
        default=None, description="client certificate for rediss:// URLs"
    )
    tls_keyfile: str | None = Field(
        default=None, description="client key for rediss:// URLs"
    )

    @field_validator("redis_url")
    @classmethod
    def _check_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://", "memory://")):
            msg = (
                f"redis_url {_redact(value)!r} has an unsupported scheme; use "
                "redis://, rediss:// (TLS), unix:// or memory:// (in-process)"
            )
            raise ValueError(msg)
        return value

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> Settings:
        """Build settings for ``url``, taking other fields from the environment."""
        return cls(redis_url=url, **overrides)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"Settings(redis_url={_redact(self.redis_url)!r}, prefix={self.prefix!r})"
        )


def _redact(url: str) -> str:
    """Hide the password of a Redis URL, so that logs and reprs never show it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}"


redact_url = _redact
