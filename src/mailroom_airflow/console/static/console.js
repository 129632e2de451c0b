// The campaign console's run page: refreshes its progress while the run moves, and asks for a
// reason and a confirmation before an action. No other script runs on these pages.
"use strict";

const STATES = ["staged", "sending", "sent", "failed", "unknown", "halted"];
const OUTCOMES = ["delivered", "bounced", "dropped", "complained", "unsubscribed"];
const fmt = (n) => Number(n).toLocaleString("en-US");

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

function field(name) {
  return document.querySelector(`[data-field="${name}"]`);
}

function fillRow(row, part, last) {
  if (!row) return;
  for (const cell of row.querySelectorAll("[data-state]")) {
    const key = cell.dataset.state;
    const value = key === "requests" ? part.requests.total : part[last][key];
    if (value !== undefined) cell.textContent = fmt(value);
  }
}

function render(p) {
  field("sent").textContent = fmt(p.sent);
  field("total").textContent = fmt(p.total);
  field("percent").textContent = p.percent;
  field("rate").textContent = p.rate_per_second;
  field("eta").textContent = duration(p.eta_seconds);
  const badge = document.querySelector("h1 [data-field=state]");
  if (badge) {
    badge.textContent = p.state;
    badge.className = `badge state-${p.state.replace(/ /g, "-")}`;
  }
  const total = p.overall.recipients.total || 1;
  for (const seg of document.querySelectorAll("[data-seg]")) {
    seg.style.width = `${(100 * p.overall.recipients[seg.dataset.seg]) / total}%`;
  }
  document.querySelector(".bar").setAttribute("aria-valuenow", p.percent);
  for (const kind of ["recipients", "requests"]) {
    const row = document.querySelector(`[data-table=overall] [data-kind=${kind}]`);
    for (const cell of row.querySelectorAll("[data-state]")) {
      cell.textContent = fmt(p.overall[kind][cell.dataset.state]);
    }
  }
  p.shards.forEach((part, i) =>
    fillRow(document.querySelector(`[data-table=shards] [data-row="${i}"]`), part, "recipients"));
  for (const [loc, part] of Object.entries(p.locales)) {
    fillRow(document.querySelector(`[data-table=locales] [data-row="${loc}"]`), part, "recipients");
  }
  renderFeedback(p.delivery_feedback);
  field("refreshing").textContent = p.settled ? "" : "· refreshing every 2 s";
}

// "After the provider accepted it": one row per locale, then the total; a locale that was not
// on the page yet gets its row (built with textContent only).
function renderFeedback(fb) {
  const table = document.querySelector("[data-table=feedback]");
  if (!table || !fb) return;
  const body = table.querySelector("tbody");
  for (const [loc, counts] of Object.entries(fb.per_locale)) {
    let row = [...body.rows].find((r) => r.dataset.row === loc);
    if (!row) {
      row = body.insertRow();
      row.dataset.row = loc;
      const head = document.createElement("th");
      head.textContent = loc;
      row.appendChild(head);
      for (const outcome of OUTCOMES) {
        const cell = row.insertCell();
        cell.className = "num";
        cell.dataset.outcome = outcome;
      }
    }
    fillOutcomes(row, counts);
  }
  fillOutcomes(table.querySelector("tfoot [data-row=total]"), fb.total);
  const empty = field("feedback-empty");
  if (empty) empty.hidden = OUTCOMES.some((o) => fb.total[o] > 0);
}

function fillOutcomes(row, counts) {
  if (!row) return;
  for (const cell of row.querySelectorAll("[data-outcome]")) {
    const value = counts[cell.dataset.outcome];
    if (value !== undefined) cell.textContent = fmt(value);
  }
}

async function refresh(root) {
  try {
    const answer = await fetch(root.dataset.progress, { credentials: "same-origin", cache: "no-store" });
    if (answer.ok) {
      const p = await answer.json();
      render(p);
      root.dataset.settled = p.settled ? "true" : "false";
    }
  } catch (err) {
    // A missed refresh is retried on the next tick.
  }
  setTimeout(() => refresh(root), root.dataset.settled === "true" ? 10000 : 2000);
}

function wireActions(root) {
  const dialog = document.getElementById("confirm");
  if (!dialog) return;
  const csrf = document.querySelector('meta[name="mailroom-csrf"]').content;
  let action = null;
  for (const button of document.querySelectorAll("[data-action]")) {
    button.addEventListener("click", () => {
      action = button.dataset.action;
      field("dialog-title").textContent = button.dataset.title;
      field("dialog-text").textContent = button.dataset.text;
      field("dialog-confirm").textContent = `Confirm: ${button.textContent.trim()}`;
      field("dialog-error").hidden = true;
      dialog.querySelector("textarea").value = "";
      dialog.showModal();
    });
  }
  dialog.addEventListener("close", async () => {
    if (dialog.returnValue !== "confirm" || !action) return;
    const reason = dialog.querySelector("textarea").value.trim();
    const result = field("action-result");
    const answer = await fetch(`${root.dataset.actions}/${action}`, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Mailroom-CSRF": csrf },
      body: JSON.stringify({ reason, confirm: true }),
    });
    const data = await answer.json().catch(() => ({}));
    result.hidden = false;
    if (!answer.ok) {
      result.className = "notice bad";
      result.textContent = `${action} refused: ${data.detail || answer.status}`;
      return;
    }
    result.className = "notice";
    const cleared = data.cleared;
    result.textContent = `${action} recorded (by ${data.action.by}: ${data.action.reason})` +
      (cleared ? (cleared.ok ? `; Airflow cleared ${cleared.tasks} task(s): the run sends again`
                             : `; clearing the send tasks failed: ${cleared.error}`) : "");
    root.dataset.settled = "false";
  });
}

function wireFilters() {
  for (const form of document.querySelectorAll("form[data-autosubmit]")) {
    for (const select of form.querySelectorAll("select")) {
      select.addEventListener("change", () => form.submit());
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  wireFilters();
  const root = document.getElementById("console");
  if (!root) return;
  wireActions(root);
  const p = root.dataset.progress;
  if (p) refresh(root);
});
