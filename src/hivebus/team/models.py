"""Event payloads of the team flow, their event types and their channels.

Every team event carries the task id as its correlation id and the id of
the event that caused it as its causation id, so a task's events form a
tree rooted at its ``team.task.submitted`` event.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from hivebus.events import EventTypes
from hivebus.team.work import Design, Finding, Implementation, Plan, Role, Story
from hivebus.team.work import TestReport as TestReportModel

WorkerRole = Literal["developer", "ux", "tester"]
AgentState = Literal["started", "progress", "done", "failed"]
TaskStatus = Literal[
    "submitted",
    "planning",
    "awaiting_approval",
    "running",
    "completed",
    "failed",
    "cancelled",
]
END_STATES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

# Durable channels (streams), each read by one role's consumer group.
TASKS_CHANNEL = "team.tasks"  # submitted tasks -> master
CONTROL_CHANNEL = "team.control"  # plan approvals and rejections -> master
PLANNING_CHANNEL = "team.planning"  # plans -> pm
STORIES_CHANNEL = "team.stories"  # stories -> master
RESULTS_CHANNEL = "team.results"  # implementations, designs, test reports -> master
STATUS_CHANNEL = "team.status"  # agent status -> master
# Broadcast channel (Pub/Sub) of progress updates and task ends.
PROGRESS_CHANNEL = "team.progress"


def work_channel(role: WorkerRole) -> str:
    """Return the durable channel on which ``role`` receives its assignments."""
    return f"team.work.{role}"


class TaskSubmitted(BaseModel):
    """A task handed to the master. Its limits are fixed here, for the task's life."""

    task_id: str
    text: str = Field(min_length=1, max_length=20_000)
    project: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    approve_plan: bool = False
    max_test_rounds: int = Field(default=2, ge=1, le=20)
    token_budget: int | None = Field(default=None, ge=1)


class PlanCreated(BaseModel):
    """The master's breakdown of a task: the planning event the pm works on."""

    task_id: str
    plan_version: int = Field(ge=1)
    plan: Plan
    text: str
    comment: str | None = None


class PlanApproved(BaseModel):
    """A person approved version ``plan_version`` of a task's plan."""

    task_id: str
    plan_version: int = Field(ge=1)


class PlanRejected(BaseModel):
    """A person rejected a plan; the master plans again with the comment."""

    task_id: str
    plan_version: int = Field(ge=1)
    comment: str = Field(min_length=1, max_length=4000)


class StoryCreated(BaseModel):
    """One story of a plan version; ``total`` is the number of stories in the plan."""

    task_id: str
    plan_version: int = Field(ge=1)
    story: Story
    index: int = Field(ge=0)
    total: int = Field(ge=1)


class Assignment(BaseModel):
    """Work for one role on one story in one test round.

    A developer's assignment in round 2 or later carries the findings of the
    failed test round before it; a tester's carries the implementation.
    """

    task_id: str
    role: WorkerRole
    story: Story
    round: int = Field(ge=1)
    findings: list[Finding] = Field(default_factory=list)
    implementation: Implementation | None = None


class ImplementationDone(BaseModel):
    """The developer's implementation of a story for one round."""

    task_id: str
    story_key: str
    round: int = Field(ge=1)
    implementation: Implementation


class DesignDone(BaseModel):
    """The UX designer's design of a story."""

    task_id: str
    story_key: str
    design: Design


class TestReported(BaseModel):
    """The tester's verdict on one round's implementation of a story."""

    __test__ = False  # not a pytest test class, despite the name

    task_id: str
    story_key: str
    round: int = Field(ge=1)
    report: TestReportModel


class WorkFailed(BaseModel):
    """A role could not do its work because its brain returned no valid reply."""

    task_id: str
    role: Role
    story_key: str | None = None
    round: int = Field(default=1, ge=1)
    reason: str


class AgentStatus(BaseModel):
    """An agent's current activity on a piece of work, sent on the status channel."""

    task_id: str
    role: Role
    state: AgentState
    story_key: str | None = None
    round: int = Field(default=1, ge=1)
    worker: str = ""
    detail: str = ""


class ProgressUpdate(BaseModel):
    """One entry of a task's progress stream, also broadcast live.

    ``id`` is the entry's stream id; ids increase within a task, so a client
    resumes after the last id it saw. The entry with ``final`` set is the
    last one of the task and carries its end state.
    """

    task_id: str
    id: str = ""
    kind: Literal["task", "role", "story", "end"]
    status: TaskStatus = "submitted"
    percent: int = Field(default=0, ge=0, le=100)
    role: Role | None = None
    story_key: str | None = None
    state: str | None = None
    round: int | None = None
    message: str = ""
    reason: str | None = None
    final: bool = False
    cause: str | None = None
    time_ms: int = 0


class TaskEnded(BaseModel):
    """A task reached an end state: completed, failed (with reason) or cancelled."""

    task_id: str
    status: TaskStatus
    reason: str | None = None


EVENT_TYPES: dict[str, type[BaseModel]] = {
    "team.task.submitted": TaskSubmitted,
    "team.plan.created": PlanCreated,
    "team.plan.approved": PlanApproved,
    "team.plan.rejected": PlanRejected,
    "team.story.created": StoryCreated,
    "team.story.assigned": Assignment,
    "team.implementation.done": ImplementationDone,
    "team.design.done": DesignDone,
    "team.test.reported": TestReported,
    "team.work.failed": WorkFailed,
    "team.agent.status": AgentStatus,
    "team.task.progress": ProgressUpdate,
    "team.task.ended": TaskEnded,
}


def register_types(types: EventTypes) -> EventTypes:
    """Register every team payload model on ``types`` and return it."""
    for event_type, model in EVENT_TYPES.items():
        if event_type not in types:
            types.register(event_type, model)
    return types


__all__ = [
    "END_STATES",
    "EVENT_TYPES",
    "AgentStatus",
    "Assignment",
    "DesignDone",
    "ImplementationDone",
    "PlanApproved",
    "PlanCreated",
    "PlanRejected",
    "ProgressUpdate",
    "StoryCreated",
    "TaskEnded",
    "TaskSubmitted",
    "TestReported",
    "WorkFailed",
    "register_types",
]
