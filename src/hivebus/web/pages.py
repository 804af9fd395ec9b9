"""The dashboard's pages: server-rendered templates over the same data as the API."""

from __future__ import annotations

import hmac
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from hivebus import metrics
from hivebus.dlq import make_id
from hivebus.errors import ContextNotFoundError
from hivebus.team.project import SECTIONS
from hivebus.team.project import context_id as project_context_id
from hivebus.team.tree import event_tree
from hivebus.team.work import ROLES
from hivebus.web import api_contexts, api_prompts, api_tasks
from hivebus.web.api_breakers import read_breakers
from hivebus.web.auth import COOKIE_MAX_AGE, COOKIE_NAME, safe_next, session_value
from hivebus.web.services import Services, services

router = APIRouter(include_in_schema=False)

ServicesDep = Annotated[Services, Depends(services)]
MAX_FORM_BYTES = 4096  # the login form contains one token


def render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
    """Render template ``name`` with ``context`` and the common values."""
    app: Services = request.app.state.services
    context.setdefault("title", name.removesuffix(".html"))
    context["token_required"] = app.token is not None
    return app.templates.TemplateResponse(request, name, context, status_code=status)


def error_page(request: Request, status: int, detail: str) -> Response:
    """Render an error as a page."""
    return render(request, "error.html", status, title="error", detail=detail)


# -- login ----------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str = "/") -> Response:
    """Show the token form."""
    return render(request, "login.html", target=safe_next(next), failed=False)


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the token from the form and set the session cookie."""
    app: Services = request.app.state.services
    body = await request.body()
    form = parse_qs(body[:MAX_FORM_BYTES].decode(errors="replace"))
    given = form.get("token", [""])[0]
    target = safe_next(form.get("next", ["/"])[0])
    if app.token is None:
        return RedirectResponse(target, status_code=303)
    if not hmac.compare_digest(given.encode(), app.token.encode()):
        return render(request, "login.html", 401, target=target, failed=True)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        session_value(app.token),
        max_age=COOKIE_MAX_AGE,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout() -> Response:
    """Drop the session cookie."""
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE_NAME)
    return response


# -- tasks and events -----------------------------------------------------


@router.get("/")
async def home() -> Response:
    """Send the browser to the task list."""
    return RedirectResponse("/tasks", status_code=303)


@router.get("/tasks", response_class=HTMLResponse)
async def tasks_page(request: Request, app: ServicesDep) -> Response:
    """List recent tasks with live progress bars, and a form to submit one."""
    tasks = await api_tasks.recent_tasks(app, limit=50)
    return render(request, "tasks.html", tasks=tasks)


@router.get("/tasks/{task_id}", response_class=HTMLResponse)
async def task_page(request: Request, task_id: str, app: ServicesDep) -> Response:
    """Show one task: live progress, its event tree and its context sections."""
    detail = await api_tasks.task_detail(app, task_id)
    tree = event_tree(await api_tasks.task_store(app).events(task_id))
    sections = await _task_sections(app, detail["task"]["project"], task_id)
    return render(
        request,
        "task.html",
        title=f"task {task_id}",
        detail=detail,
        tree=tree,
        sections=sections,
    )


async def _task_sections(app: Services, project: str, task_id: str) -> dict[str, Any]:
    try:
        context = await app.contexts.get(project_context_id(project))
    except ContextNotFoundError:
        return {}
    found = {}
    for section in SECTIONS:
        entry = context.data.get(section, {}).get(task_id)
        if entry is not None:
            found[section] = entry
    return {"context": context, "entries": found}


@router.get("/feed", response_class=HTMLResponse)
async def feed_page(request: Request) -> Response:
    """Show the live event feed with channel and type filters."""
    return render(
        request,
        "feed.html",
        channel=request.query_params.get("channel", ""),
        type=request.query_params.get("type", ""),
    )


@router.get("/events")
async def event_lookup(id: str = "") -> Response:
    """Send the lookup form on to the event's page."""
    if not id.strip():
        return RedirectResponse("/feed", status_code=303)
    return RedirectResponse(f"/events/{quote(id.strip(), safe='')}", status_code=303)


@router.get("/events/{event_id}", response_class=HTMLResponse)
async def event_page(request: Request, event_id: str, app: ServicesDep) -> Response:
    """Show one stored event."""
    event = await app.bus.get_event(event_id)
    body = event.model_dump(mode="json", exclude_none=True)
    return render(request, "event.html", title=f"event {event_id}", event=body)


# -- dead letters ---------------------------------------------------------


@router.get("/dlq", response_class=HTMLResponse)
async def dlq_page(
    request: Request, app: ServicesDep, channel: str | None = None
) -> Response:
    """List dead letters with replay and purge."""
    dlq = app.bus.dlq
    entries = await dlq.entries(channel=channel or None, limit=200)
    return render(
        request,
        "dlq.html",
        title="dead letters",
        entries=entries,
        count=await dlq.count(channel or None),
        channels=await dlq.channels(),
        channel=channel or "",
    )


@router.get("/dlq/{channel}/{entry_id}", response_class=HTMLResponse)
async def dead_letter_page(
    request: Request, channel: str, entry_id: str, app: ServicesDep
) -> Response:
    """Show one dead letter with its event, error and traceback."""
    entry = await app.bus.dlq.get(make_id(channel, entry_id))
    return render(request, "dead_letter.html", title="dead letter", entry=entry)


# -- contexts, prompts, breakers, stats -----------------------------------


@router.get("/contexts", response_class=HTMLResponse)
async def contexts_page(request: Request, app: ServicesDep) -> Response:
    """List contexts."""
    contexts = await api_contexts.list_contexts(app)
    return render(request, "contexts.html", contexts=contexts)


@router.get("/contexts/{context_id}", response_class=HTMLResponse)
async def context_page(
    request: Request,
    context_id: str,
    app: ServicesDep,
    from_version: int | None = None,
    to_version: int | None = None,
) -> Response:
    """Show a context's current data, its versions, and a diff of two versions."""
    history = await app.contexts.history(context_id)
    current = history[-1]
    to_version = to_version or current.version
    from_version = from_version or max(history[0].version, to_version - 1)
    diff = None
    if from_version != to_version:
        diff = await app.contexts.diff(context_id, from_version, to_version)
    return render(
        request,
        "context.html",
        title=f"context {context_id}",
        context=current,
        history=list(reversed(history)),
        diff=diff,
        from_version=from_version,
        to_version=to_version,
    )


@router.get("/prompts", response_class=HTMLResponse)
async def prompts_page(request: Request, app: ServicesDep) -> Response:
    """List each role's prompt in use."""
    prompts = await api_prompts.list_prompts(app)
    return render(request, "prompts.html", prompts=prompts)


@router.get("/prompts/{role}", response_class=HTMLResponse)
async def prompt_page(request: Request, role: str, app: ServicesDep) -> Response:
    """Show a role's prompt versions with their reasons and diffs."""
    history = await api_prompts.prompt_history(role, app)
    history["versions"] = list(reversed(history["versions"]))
    return render(
        request, "prompt.html", title=f"prompt {role}", prompt=history, roles=ROLES
    )


@router.get("/breakers", response_class=HTMLResponse)
async def breakers_page(request: Request, app: ServicesDep) -> Response:
    """Show every circuit breaker's state."""
    breakers = await read_breakers(app.bus)
    return render(request, "breakers.html", breakers=breakers)


@router.get("/stats", response_class=HTMLResponse)
async def stats_page(request: Request, app: ServicesDep) -> Response:
    """Show the event counters of every process."""
    shared = await metrics.read_shared(app.bus.client, app.bus.keys)
    rows = sorted(set(shared.handled) | set(shared.failed) | set(shared.dead_lettered))
    return render(request, "stats.html", shared=shared, rows=rows)
