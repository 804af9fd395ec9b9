"""The chat brain against a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from hivebus import BreakerConfig, BreakerOpenError
from hivebus.errors import BrainReplyError, BrainServerError, ConfigError
from hivebus.team.brain import CONTEXT, STORY, TASK, Ask, compose_prompt
from hivebus.team.config import TeamSettings, make_brain
from hivebus.team.offline import OfflineBrain
from hivebus.team.openai_brain import OpenAIBrain
from hivebus.team.prompts import DEFAULT_PROMPTS
from hivebus.team.work import StoryList
from tests.fake_llm import FakeLLM, Reply, Request

TASK_TEXT = (
    "Add CSV export to the orders page: filter by date range, include totals, "
    "record who exported"
)
STORIES = {
    "stories": [
        {
            "key": "S1",
            "title": "Export orders as CSV",
            "description": "Export the orders page as CSV.",
            "acceptance_criteria": ["filter by date range", "include totals"],
        },
        {
            "key": "S2",
            "title": "Record exports",
            "description": "Record who exported.",
            "acceptance_criteria": ["record who exported"],
        },
    ]
}
MISSING_CRITERIA = {
    "stories": [
        STORIES["stories"][0],
        {k: v for k, v in STORIES["stories"][1].items() if k != "acceptance_criteria"},
    ]
}


def pm_ask(prompt: str | None = None) -> Ask[StoryList]:
    return Ask(
        role="pm",
        system=DEFAULT_PROMPTS["pm"],
        prompt=prompt if prompt is not None else compose_prompt({TASK: TASK_TEXT}),
        schema=StoryList,
        task_id="t-1",
    )


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture
async def brain_for(fake: FakeLLM) -> AsyncIterator[Callable[..., OpenAIBrain]]:
    """A factory of brains on the fake, with short backoffs; all closed at the end."""
    brains: list[OpenAIBrain] = []

    def factory(**options: Any) -> OpenAIBrain:
        settings: dict[str, Any] = {
            "timeout": 5.0,
            "backoff_base": 0.01,
            "backoff_cap": 0.05,
        }
        settings.update(options)
        brain = OpenAIBrain(fake.url, "test-model", **settings)
        brains.append(brain)
        return brain

    yield factory
    for brain in brains:
        await brain.aclose()


def request_chars(request: Request) -> int:
    return sum(len(json.dumps(m["content"])) for m in request.messages)


# -- request shape ---------------------------------------------------------


async def test_request_body_well_formed(fake: FakeLLM, brain_for: Any) -> None:
    fake.script("pm", Reply.of(STORIES))
    brain = brain_for(api_key="sk-test-key")

    thought = await brain.think(pm_ask())

    assert thought.value.stories[0].key == "S1"
    (request,) = fake.requests
    assert request.path.endswith("/v1/chat/completions")
    assert request.body["model"] == "test-model"
    assert [m["role"] for m in request.messages] == ["system", "user"]
    assert request.system.startswith(DEFAULT_PROMPTS["pm"])
    assert '"stories"' in request.system
    assert request.last_user == compose_prompt({TASK: TASK_TEXT})
    assert request.body["max_tokens"] == 1024
    response_format = request.body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == "StoryList"
    assert "stories" in response_format["json_schema"]["schema"]["properties"]
    assert request.headers["authorization"] == "Bearer sk-test-key"
    assert request.headers["x-hivebus-role"] == "pm"
    assert request.headers["x-hivebus-task"] == "t-1"


async def test_response_format_setting_off(fake: FakeLLM, brain_for: Any) -> None:
    fake.script("pm", Reply.of(STORIES))
    brain = brain_for(response_format=False)

    await brain.think(pm_ask())
    await brain.think(pm_ask())

    assert len(fake.requests) == 2
    assert all("response_format" not in r.body for r in fake.requests)


# -- replies that do not fit ---------------------------------------------


async def test_schema_failure_retried_with_error(fake: FakeLLM, brain_for: Any) -> None:
    fake.script("pm", Reply.of(MISSING_CRITERIA), Reply.of(STORIES))

    thought = await brain_for().think(pm_ask())

    assert thought.calls == 2
    assert [r.kind for r in thought.rejections] == ["schema"]
    assert "acceptance_criteria" in thought.rejections[0].detail
    retry = fake.requests[1]
    assert len(fake.requests) == 2
    assert [m["role"] for m in retry.messages] == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    assert retry.messages[2]["content"] == json.dumps(MISSING_CRITERIA)
    assert "stories.1.acceptance_criteria" in retry.last_user
    assert "Field required" in retry.last_user


async def test_fenced_json_accepted_without_retry(
    fake: FakeLLM, brain_for: Any
) -> None:
    fenced = f"Here are the stories.\n```json\n{json.dumps(STORIES, indent=2)}\n```\n"
    fake.script("pm", Reply(content=fenced))

    thought = await brain_for().think(pm_ask())

    assert len(fake.requests) == 1
    assert thought.rejections == ()
    assert [s.key for s in thought.value.stories] == ["S1", "S2"]


async def test_comment_lines_accepted_without_retry(
    fake: FakeLLM, brain_for: Any
) -> None:
    text = json.dumps(STORIES, indent=2).replace(
        '"stories": [', '"stories": [ // two stories, see https://example.test/a'
    )
    text = text.replace('"include totals"\n', '"include totals", // note\n')
    fake.script("pm", Reply(content=text))

    thought = await brain_for().think(pm_ask())

    assert len(fake.requests) == 1
    assert thought.value.stories[0].acceptance_criteria[-1] == "include totals"


async def test_truncated_reply_detected(fake: FakeLLM, brain_for: Any) -> None:
    cut = json.dumps(STORIES)[:60]
    fake.script("pm", Reply(content=cut, finish_reason="length"), Reply.of(STORIES))

    thought = await brain_for().think(pm_ask())

    assert [r.kind for r in thought.rejections] == ["truncated"]
    assert "finish_reason=length" in thought.rejections[0].detail
    assert len(fake.requests) == 2
    assert "shorter JSON object" in fake.requests[1].last_user


async def test_prose_reply_rejected_as_json(fake: FakeLLM, brain_for: Any) -> None:
    fake.script("pm", Reply(content="Sorry, I cannot help."), Reply.of(STORIES))

    thought = await brain_for().think(pm_ask())

    assert [r.kind for r in thought.rejections] == ["json"]
    assert "not valid JSON" in fake.requests[1].last_user


async def test_attempts_exhausted_raise_reply_error(
    fake: FakeLLM, brain_for: Any
) -> None:
    fake.script("pm", Reply.of(MISSING_CRITERIA))

    with pytest.raises(BrainReplyError) as caught:
        await brain_for(max_attempts=3).think(pm_ask())

    assert len(fake.requests) == 3
    assert "acceptance_criteria" in str(caught.value)
    assert "HIVEBUS_BRAIN_MAX_ATTEMPTS" in str(caught.value)
    assert [r.kind for r in caught.value.rejections] == ["schema"] * 3
    assert caught.value.usage is not None
    assert caught.value.usage.total == 3 * 150


# -- usage -------------------------------------------------------------------


async def test_usage_taken_from_server(fake: FakeLLM, brain_for: Any) -> None:
    fake.script("pm", Reply.of(MISSING_CRITERIA), Reply.of(STORIES))

    thought = await brain_for().think(pm_ask())

    assert thought.usage.prompt_tokens == 200
    assert thought.usage.completion_tokens == 100
    assert thought.usage.estimated is False


async def test_missing_usage_estimated_and_marked(
    fake: FakeLLM, brain_for: Any
) -> None:
    fake.script("pm", Reply.of(STORIES, usage=None))

    thought = await brain_for().think(pm_ask())

    assert thought.usage.estimated is True
    assert thought.usage.prompt_tokens >= request_chars(fake.requests[0]) // 5
    assert thought.usage.completion_tokens == -(-len(json.dumps(STORIES)) // 4)


# -- server errors -------------------------------------------------------------


async def test_server_errors_bounded_then_raise(fake: FakeLLM, brain_for: Any) -> None:
    fake.script("pm", Reply.error(503, {"error": {"message": "overloaded"}}))

    with pytest.raises(BrainServerError, match="failed 3 requests in a row"):
        await brain_for(server_retries=3).think(pm_ask())

    assert len(fake.requests) == 3


async def test_timeouts_bounded_then_raise(fake: FakeLLM, brain_for: Any) -> None:
    fake.script("pm", Reply(content=json.dumps(STORIES), delay=3.0))
    started = time.monotonic()

    with pytest.raises(BrainServerError, match=r"no reply within 0\.3s"):
        await brain_for(timeout=0.3, server_retries=2).think(pm_ask())

    assert time.monotonic() - started < 2.0
    assert len(fake.requests) == 2


async def test_breaker_opens_and_fails_fast(
    fake: FakeLLM, brain_for: Any, make_bus: Any
) -> None:
    fake.script("pm", Reply.error(500, {"error": {"message": "internal error"}}))
    bus = make_bus()
    await bus.connect()
    breaker = bus.breaker("brain.test", BreakerConfig(failure_threshold=3, cooldown=60))
    brain = brain_for(server_retries=3, breaker=breaker)

    with pytest.raises(BrainServerError):
        await brain.think(pm_ask())
    sent = len(fake.requests)
    started = time.monotonic()
    with pytest.raises(BreakerOpenError) as caught:
        await brain.think(pm_ask())

    assert sent == 3
    assert len(fake.requests) == sent
    assert time.monotonic() - started < 1.0
    assert "brain.test" in str(caught.value)
    assert (await breaker.state()).state == "open"


async def test_rate_limit_honours_retry_after(
    fake: FakeLLM, brain_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    limited = Reply.error(
        429,
        {"error": {"type": "rate_limit_error", "code": "rate_limit_exceeded"}},
        headers={"Retry-After": "1"},
    )
    fake.script("pm", limited, Reply.of(STORIES))
    caplog.set_level(logging.WARNING, logger="hivebus.team.openai_brain")

    thought = await brain_for().think(pm_ask())

    first, second = fake.requests
    assert second.arrived - first.arrived >= 0.95
    assert thought.rejections == ()
    assert thought.calls == 1
    assert "wait=1.0s" in caplog.text


async def test_quota_error_not_retried(fake: FakeLLM, brain_for: Any) -> None:
    fake.script(
        "pm",
        Reply.error(
            429,
            {
                "error": {
                    "message": "You exceeded your current quota",
                    "code": "insufficient_quota",
                }
            },
        ),
    )

    with pytest.raises(BrainServerError) as caught:
        await brain_for().think(pm_ask())

    assert len(fake.requests) == 1
    assert "insufficient_quota" in str(caught.value)
    assert "You exceeded your current quota" in str(caught.value)
    assert "HIVEBUS_BRAIN_API_KEY" in str(caught.value)


async def test_not_found_not_retried(fake: FakeLLM, brain_for: Any) -> None:
    fake.script("pm", Reply.error(404, {"error": "model 'test-model' not found"}))

    with pytest.raises(BrainServerError, match="HIVEBUS_BRAIN_MODEL") as caught:
        await brain_for().think(pm_ask())

    assert len(fake.requests) == 1
    assert "model 'test-model' not found" in str(caught.value)


# -- servers that differ -------------------------------------------------------


def reject_response_format(status: int, body: Any) -> Callable[[Request], Reply | None]:
    def handler(request: Request) -> Reply | None:
        if "response_format" in request.body:
            return Reply.error(status, body)
        return None

    return handler


async def test_response_format_dropped_after_400(
    fake: FakeLLM, brain_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fake.on_request = reject_response_format(
        400,
        {
            "error": {
                "message": "Unsupported parameter",
                "code": "unsupported_parameter",
                "param": "response_format",
            }
        },
    )
    fake.script("pm", Reply.of(STORIES))
    caplog.set_level(logging.WARNING, logger="hivebus.team.openai_brain")

    thought = await brain_for().think(pm_ask())
    await brain_for().think(pm_ask())

    with_field = [r for r in fake.requests if "response_format" in r.body]
    assert len(with_field) == 1
    assert len(fake.requests) == 3
    warnings = [r for r in caplog.records if "field=response_format" in r.message]
    assert len(warnings) == 1
    assert fake.url in warnings[0].message
    assert any("response_format" in note for note in thought.notes)


async def test_response_format_500_downgrades(fake: FakeLLM, brain_for: Any) -> None:
    fake.on_request = reject_response_format(
        500, {"error": {"message": "Unsupported param: response_format"}}
    )
    fake.script("pm", Reply.of(STORIES))

    await brain_for(server_retries=3).think(pm_ask())

    assert len(fake.requests) == 2
    assert "response_format" not in fake.requests[1].body


async def test_max_completion_tokens_switch(fake: FakeLLM, brain_for: Any) -> None:
    def handler(request: Request) -> Reply | None:
        if "max_tokens" in request.body:
            message = (
                "Unsupported parameter: 'max_tokens' is not supported with this "
                "model. Use 'max_completion_tokens' instead."
            )
            return Reply.error(
                400,
                {"error": {"message": message, "param": "max_tokens"}},
            )
        return None

    fake.on_request = handler
    fake.script("pm", Reply.of(STORIES))

    await brain_for().think(pm_ask())

    assert len(fake.requests) == 2
    assert "max_tokens" not in fake.requests[1].body
    assert fake.requests[1].body["max_completion_tokens"] == 1024


# -- the context window -----------------------------------------------------


async def test_long_prompt_trimmed_to_window(fake: FakeLLM, brain_for: Any) -> None:
    fake.script("pm", Reply.of(STORIES))
    story = "STORY-MARKER " + "s" * 500
    prompt = compose_prompt(
        {TASK: TASK_TEXT, CONTEXT: "old context " * 3000, STORY: story}
    )
    window, reply_tokens = 4096, 512

    thought = await brain_for(context_window=window, max_tokens=reply_tokens).think(
        pm_ask(prompt)
    )

    (request,) = fake.requests
    assert request_chars(request) / 4 + reply_tokens <= window
    assert TASK_TEXT in request.last_user
    assert story in request.last_user
    assert "characters trimmed to fit the context window" in request.last_user
    assert any("section 'context'" in note for note in thought.notes)
    assert any("brain_context_window=4096" in note for note in thought.notes)


async def test_context_length_error_retried_smaller(
    fake: FakeLLM, brain_for: Any
) -> None:
    too_long = Reply.error(
        400,
        {
            "error": {
                "message": "This model's maximum context length is 8192 tokens",
                "code": "context_length_exceeded",
            }
        },
    )
    fake.script("pm", too_long, Reply.of(STORIES))
    prompt = compose_prompt({TASK: TASK_TEXT, CONTEXT: "x" * 20_000})

    thought = await brain_for().think(pm_ask(prompt))

    first, second = fake.requests
    assert len(second.last_user) < len(first.last_user)
    assert any("half the prompt budget" in note for note in thought.notes)


# -- settings ----------------------------------------------------------------


async def test_api_key_never_logged(
    fake: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    limited = Reply.error(
        429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}
    )
    fake.script("pm", limited, Reply.of(MISSING_CRITERIA), Reply.of(STORIES))
    settings = TeamSettings(
        brain_url=fake.url, brain_model="test-model", brain_api_key="sk-secret-123"
    )
    caplog.set_level(logging.DEBUG)
    brain = make_brain(settings)
    try:
        await brain.think(pm_ask())
    finally:
        await brain.aclose()

    assert fake.requests[0].headers["authorization"] == "Bearer sk-secret-123"
    assert "sk-secret-123" not in caplog.text
    assert "sk-secret-123" not in repr(settings)
    assert "sk-secret-123" not in repr(brain)


def test_make_brain_picks_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEBUS_BRAIN_MAX_ATTEMPTS", "5")

    offline = make_brain(TeamSettings())
    settings = TeamSettings(brain_url="http://127.0.0.1:9/v1/", brain_model="m")
    chat = make_brain(settings)

    assert isinstance(offline, OfflineBrain)
    assert isinstance(chat, OpenAIBrain)
    assert chat.base_url == "http://127.0.0.1:9/v1"
    assert chat.max_attempts == 5
    with pytest.raises(ConfigError, match="HIVEBUS_BRAIN_MODEL"):
        make_brain(TeamSettings(brain_url="http://127.0.0.1:9/v1"))


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        TeamSettings(brain_url="127.0.0.1:8000")
    with pytest.raises(ValueError, match="at most half"):
        TeamSettings(brain_context_window=2048, brain_max_tokens=1500)
