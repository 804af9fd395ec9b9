// hivebus dashboard: small page scripts, no build step.
"use strict";

function setBar(bar, percent, state) {
  if (!bar) return;
  const value = Math.max(0, Math.min(100, Number(percent) || 0));
  bar.querySelector(".fill").style.width = value + "%";
  bar.querySelector(".label").textContent = value + "%";
  bar.setAttribute("aria-valuenow", String(value));
  bar.classList.toggle("done", state === "completed");
  bar.classList.toggle("failed", state === "failed" || state === "cancelled");
}

function setStatus(el, status) {
  if (!el) return;
  el.textContent = status;
  el.className = "status status-" + status;
}

async function requestJson(method, url, body) {
  const options = { method, headers: { "Accept": "application/json" } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail ? JSON.stringify(data.detail) : response.statusText);
  return data;
}

// Task list: the submit form, and live bars from the broadcast of every task.
function initTaskList() {
  const form = document.getElementById("submit-task");
  if (form) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const error = document.getElementById("submit-error");
      error.hidden = true;
      const fields = new FormData(form);
      try {
        const created = await requestJson("POST", "/api/tasks", {
          text: fields.get("text"),
          project: fields.get("project") || "default",
          max_test_rounds: Number(fields.get("max_test_rounds") || 2),
          approve_plan: fields.get("approve_plan") === "on",
        });
        window.location.href = "/tasks/" + created.task_id;
      } catch (err) {
        error.textContent = "Submit failed: " + err.message;
        error.hidden = false;
      }
    });
  }
  const table = document.getElementById("task-list");
  if (!table) return;
  const source = new EventSource(table.dataset.live);
  source.addEventListener("progress", (message) => {
    const update = JSON.parse(message.data);
    const row = table.querySelector('tr[data-task="' + update.task_id + '"]');
    if (!row) return;
    setBar(row.querySelector('[data-role="bar"]'), update.percent, update.status);
    setStatus(row.querySelector('[data-role="status"]'), update.status);
  });
}

// Task page: follow the task's progress stream until its final update.
function initTaskPage() {
  const box = document.getElementById("task-progress");
  if (!box) return;
  const bar = box.querySelector('[data-role="bar"]');
  const log = document.getElementById("progress-log");
  const seen = new Set(Array.from(log.children).map((li) => li.dataset.id));
  const last = log.lastElementChild ? log.lastElementChild.dataset.id : "";
  const url = box.dataset.stream + (last ? "?after=" + encodeURIComponent(last) : "");
  if (box.dataset.ended === "true") {
    box.dataset.state = "ended";
    return;
  }
  const source = new EventSource(url);
  const show = (message) => {
    const update = JSON.parse(message.data);
    if (seen.has(update.id)) return;
    seen.add(update.id);
    setBar(bar, update.percent, update.status);
    setStatus(document.getElementById("task-status"), update.status);
    const item = document.createElement("li");
    item.dataset.id = update.id;
    item.textContent = update.percent + "% " + (update.message || update.kind);
    log.appendChild(item);
    log.scrollTop = log.scrollHeight;
    if (update.final) {
      document.getElementById("task-reason").textContent = update.reason || "";
      box.dataset.state = "ended";
      source.close();
    }
  };
  source.addEventListener("progress", show);
  source.addEventListener("end", show);
}

// Live event feed with channel and type filters.
function initFeed() {
  const table = document.getElementById("feed");
  if (!table) return;
  const filters = document.getElementById("feed-filters");
  const state = document.getElementById("feed-state");
  const body = table.querySelector("tbody");
  let source = null;
  const connect = () => {
    if (source) source.close();
    const query = new URLSearchParams();
    for (const name of ["channel", "type"]) {
      for (const value of (filters.elements[name].value || "").split(",")) {
        if (value.trim()) query.append(name, value.trim());
      }
    }
    source = new EventSource(table.dataset.stream + "?" + query.toString());
    source.addEventListener("ready", () => { state.textContent = "live"; });
    source.addEventListener("error", () => { state.textContent = "reconnecting…"; });
    source.addEventListener("dropped", (m) => {
      state.textContent = "live (" + JSON.parse(m.data).dropped + " events skipped: too many to show)";
    });
    source.addEventListener("event", (message) => {
      const item = JSON.parse(message.data);
      const row = document.createElement("tr");
      row.className = "new";
      const cells = [item.time.replace("T", " ").slice(0, 23), item.channel, null, item.source, item.preview];
      cells.forEach((text, index) => {
        const cell = document.createElement("td");
        if (index === 2) {
          const link = document.createElement("a");
          link.href = "/events/" + encodeURIComponent(item.id);
          link.textContent = item.type;
          cell.appendChild(link);
        } else {
          cell.textContent = text;
          if (index === 4) cell.className = "mono";
        }
        row.appendChild(cell);
      });
      body.insertBefore(row, body.firstChild);
      while (body.children.length > 500) body.removeChild(body.lastChild);
    });
  };
  filters.addEventListener("submit", (event) => { event.preventDefault(); connect(); });
  connect();
}

// Dead letters: replay buttons and purge with a confirmation dialog.
function initDeadLetters() {
  const message = document.getElementById("dlq-message");
  for (const button of document.querySelectorAll("button[data-replay]")) {
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const done = await requestJson("POST", button.dataset.replay);
        message.textContent = "Replayed " + done.replayed + ".";
        if (button.dataset.then) { window.location.href = button.dataset.then; return; }
        const row = button.closest("tr");
        if (row) row.remove();
        const count = document.getElementById("dlq-count");
        if (count) count.textContent = String(Math.max(0, Number(count.textContent) - 1));
      } catch (err) {
        message.textContent = "Replay failed: " + err.message;
        button.disabled = false;
      }
    });
  }
  const open = document.getElementById("purge-open");
  const dialog = document.getElementById("purge-dialog");
  if (!open || !dialog) return;
  open.addEventListener("click", () => dialog.showModal());
  dialog.addEventListener("close", async () => {
    if (dialog.returnValue !== "purge") return;
    const form = document.getElementById("purge-form");
    const olderThan = form.elements.older_than.value;
    try {
      const done = await requestJson("POST", "/api/dlq/purge", {
        channel: form.elements.channel.value || null,
        older_than: olderThan === "" ? null : Number(olderThan),
      });
      message.textContent = "Purged " + done.purged + " dead letter(s).";
      window.location.reload();
    } catch (err) {
      message.textContent = "Purge failed: " + err.message;
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  initTaskList();
  initTaskPage();
  initFeed();
  initDeadLetters();
});
