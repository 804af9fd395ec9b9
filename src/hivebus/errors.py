"""Exceptions raised by hivebus, and the signals a handler may raise.

Every failure derives from one base class, so ``except HivebusError`` catches
anything the library raises on purpose::

    HivebusError
    ├── ConfigError                 a setting or URL is invalid
    ├── InvalidEventError           bad input, rejected before it is sent
    │   ├── MalformedEventError     not JSON, or not a CloudEvents envelope
    │   ├── SchemaError             the payload fails its registered model
    │   ├── EventTooLargeError      the encoded event exceeds the size limit
    │   ├── UnknownEventTypeError   no model is registered for the type
    │   └── InvalidChannelError     the channel name cannot be used
    ├── RedisUnavailableError       Redis could not be reached in time
    ├── ConsumerGroupMissingError   a stream or consumer group vanished
    ├── EventNotFoundError          no stored event has that id
    ├── DeadLetterNotFoundError     no dead-letter entry has that id
    ├── BreakerOpenError            a circuit breaker rejects the call
    ├── RequestTimeoutError         no reply arrived before the deadline
    ├── RemoteError                 the responder raised
    ├── ListenerClosedError         the bus stopped under a temporary listener
    ├── ContextError                a context operation failed
    │   ├── ContextNotFoundError    no context (or version) has that id
    │   ├── ContextConflictError    an update was made from a stale version
    │   └── ContextValidationError  an update or event fails the context's rules
    ├── BrainError                  a model gave no usable answer
    │   ├── BrainReplyError         replies kept failing the requested model
    │   └── BrainServerError        the model server refused or kept failing
    ├── PromptError                 a role prompt operation failed
    │   └── PromptNotFoundError     no prompt version has that number
    └── TaskError                   a team task operation failed
        └── TaskNotFoundError       no task has that id

The handler signals are not failures. A handler raises them to steer what
happens to the entry it is handling:

    RetryLater      retry this entry after a delay, counting an attempt
    DeadLetter      move this entry to the dead-letter queue now, no retry
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hivebus.team.brain import Rejection, Usage


class HivebusError(Exception):
    """Base class of every error that hivebus raises on purpose."""


class ConfigError(HivebusError):
    """A setting, URL or option combination is invalid."""


class InvalidEventError(HivebusError):
    """An event was rejected before it was sent, because its input is bad."""


class MalformedEventError(InvalidEventError):
    """Text that is not JSON, or JSON that is not a CloudEvents envelope."""


class SchemaError(InvalidEventError):
    """A payload that fails the pydantic model registered for its type."""


class EventTooLargeError(InvalidEventError):
    """An encoded event larger than the configured size limit."""


class UnknownEventTypeError(InvalidEventError):
    """An event type with no registered model, sent without ``raw=True``."""


class InvalidChannelError(InvalidEventError):
    """A channel name with characters or a length that hivebus rejects."""


class RedisUnavailableError(HivebusError):
    """Redis could not be reached, or kept failing, until the deadline."""


class ConsumerGroupMissingError(HivebusError):
    """A stream or consumer group that a consumer relies on no longer exists."""


class EventNotFoundError(HivebusError):
    """No stored event has the id: it never existed, expired or was evicted."""


class DeadLetterNotFoundError(HivebusError):
    """No dead-letter entry has the id."""


class BreakerOpenError(HivebusError):
    """A circuit breaker is open (or probing) and rejects the call."""

    def __init__(self, name: str, retry_after: float) -> None:
        self.name = name
        self.retry_after = retry_after
        super().__init__(
            f"circuit breaker {name!r} is open; calls are rejected for another "
            f"{retry_after:.1f}s while the dependency recovers"
        )


class RequestTimeoutError(HivebusError, TimeoutError):
    """No reply to a request arrived before its deadline."""


class RemoteError(HivebusError):
    """The responder raised while handling a request."""

    def __init__(self, service: str, error_type: str, message: str) -> None:
        self.service = service
        self.error_type = error_type
        self.remote_message = message
        super().__init__(f"service {service!r} failed: {error_type}: {message}")


class ListenerClosedError(HivebusError):
    """The bus stopped while a temporary listener (``bus.listen``) was reading."""


class ContextError(HivebusError):
    """A context operation failed."""


class ContextNotFoundError(ContextError):
    """No context, or no such version of it, exists."""


class ContextConflictError(ContextError):
    """An update was made from a version that is no longer the current one."""

    def __init__(self, context_id: str, expected: int, actual: int) -> None:
        self.context_id = context_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"context {context_id!r} is at version {actual}, not {expected}; "
            "re-read it and apply the change again, or use `update_with_retry`"
        )


class ContextValidationError(ContextError):
    """An update, or an event's use of a context, breaks the context's rules."""


class BrainError(HivebusError):
    """A brain gave no usable answer within its attempts, timeouts and breaker.

    ``usage`` holds the tokens that the failed call still spent (a
    ``hivebus.team.brain.Usage``, or ``None`` when nothing reached a model),
    and ``rejections`` the replies it rejected, so that budgets and task
    records count them.
    """

    def __init__(
        self,
        message: str,
        *,
        usage: Usage | None = None,
        rejections: tuple[Rejection, ...] = (),
    ) -> None:
        super().__init__(message)
        self.usage = usage
        self.rejections = rejections


class BrainReplyError(BrainError):
    """The model's replies kept failing to parse or to fit the requested model."""


class BrainServerError(BrainError):
    """The model server refused the request (quota, bad parameter) or kept failing."""


class PromptError(HivebusError):
    """A role prompt operation failed: unknown role, oversized text, bad version."""


class PromptNotFoundError(PromptError):
    """No version of the role's prompt has the number."""


class TaskError(HivebusError):
    """A team task operation failed."""


class TaskNotFoundError(TaskError):
    """No task has the id."""


class RetryLater(Exception):
    """Ask for this entry to be retried, optionally after ``delay`` seconds."""

    def __init__(self, reason: str = "retry requested", delay: float | None = None):
        self.reason = reason
        self.delay = delay
        super().__init__(reason)


class DeadLetter(Exception):
    """Ask for this entry to go to the dead-letter queue at once, with a reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
