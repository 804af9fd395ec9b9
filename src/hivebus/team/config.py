"""Settings of the agent team and its brain, read from ``HIVEBUS_`` variables."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hivebus.breaker import CircuitBreaker
from hivebus.errors import ConfigError
from hivebus.team.brain import Brain
from hivebus.team.offline import OfflineBrain
from hivebus.team.openai_brain import OpenAIBrain


class TeamSettings(BaseSettings):
    """Every tunable of the team; each field is also read from ``HIVEBUS_<NAME>``.

    With no ``brain_url`` the team uses the deterministic offline brain, so
    that it runs with no network and no model.
    """

    model_config = SettingsConfigDict(env_prefix="HIVEBUS_", extra="ignore")

    brain_url: str | None = Field(
        default=None,
        description=(
            "base URL of an OpenAI-compatible chat-completions API, such as "
            "http://127.0.0.1:8000/v1 for vLLM or http://127.0.0.1:11434/v1 for "
            "Ollama; unset means the offline brain"
        ),
    )
    brain_model: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="model name sent with every request; required with brain_url",
    )
    brain_api_key: SecretStr | None = Field(
        default=None, description="bearer token for the model server; never logged"
    )
    brain_timeout: float = Field(
        default=120.0, gt=0, description="seconds to wait for one model reply"
    )
    brain_max_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description=(
            "model replies per call, the first included, while replies fail to "
            "parse or to fit the requested model"
        ),
    )
    brain_response_format: bool = Field(
        default=True,
        description=(
            "send `response_format` with a JSON schema; turn off for servers "
            "that reject it"
        ),
    )
    brain_context_window: int = Field(
        default=8192,
        ge=1024,
        description="tokens the model accepts per request, prompt and reply together",
    )
    brain_max_tokens: int = Field(
        default=1024,
        ge=64,
        description="tokens reserved for each reply and sent as its limit",
    )
    brain_server_retries: int = Field(
        default=3,
        ge=1,
        le=10,
        description=(
            "requests per reply, the first included, while the server answers "
            "5xx or times out"
        ),
    )
    brain_max_retry_after: float = Field(
        default=60.0,
        ge=0,
        description="maximum wait in seconds taken from a 429 Retry-After header",
    )
    max_test_rounds: int = Field(
        default=2,
        ge=1,
        le=10,
        description="implement-and-test rounds per story, the first included",
    )
    token_budget: int | None = Field(
        default=None, gt=0, description="tokens one task may use; unset means no limit"
    )
    approval_timeout: float = Field(
        default=24 * 60 * 60,
        gt=0,
        description="seconds a plan waits for approval before the task fails",
    )

    @field_validator("brain_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            msg = (
                f"brain_url {value!r} is not an http:// or https:// URL; give the "
                "API's base URL, such as http://127.0.0.1:8000/v1"
            )
            raise ValueError(msg)
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_reply_reserve(self) -> TeamSettings:
        if self.brain_max_tokens * 2 > self.brain_context_window:
            msg = (
                f"brain_max_tokens ({self.brain_max_tokens}) must be at most half of "
                f"brain_context_window ({self.brain_context_window}), so that a "
                "prompt still fits; lower the one or raise the other"
            )
            raise ValueError(msg)
        return self

    def __repr__(self) -> str:
        return (
            f"TeamSettings(brain_url={self.brain_url!r}, "
            f"brain_model={self.brain_model!r})"
        )


def make_brain(settings: TeamSettings, breaker: CircuitBreaker | None = None) -> Brain:
    """Build the brain that ``settings`` describe: offline, or a chat client.

    ``breaker`` guards every request of a chat client; the offline brain
    makes no requests and ignores it.
    """
    if settings.brain_url is None:
        return OfflineBrain()
    if settings.brain_model is None:
        msg = (
            f"brain_url is set to {settings.brain_url!r} but no model is named; "
            "set HIVEBUS_BRAIN_MODEL to a model the server serves"
        )
        raise ConfigError(msg)
    return OpenAIBrain.from_settings(settings, breaker=breaker)
