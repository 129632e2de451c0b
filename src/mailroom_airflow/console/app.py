"""The campaign console's FastAPI app, mounted on Airflow's API server by the plugin.

Every route requires an Airflow login and the DAG's permission through Airflow's own auth
dependencies: read (GET on the DAG's runs) to see, edit (PUT) to act and to download who was not
sent to. The pages read the run's folder and its outbox through ``mailroom.campaign_runs``;
actions go through ``mailroom.operator_actions``, then clear the run's send tasks through
Airflow's own REST API, as the signed-in user.

Cross-site requests: a browser sends the Airflow session cookie with any request to this host,
so an action authenticated by that cookie must also carry ``X-Mailroom-CSRF`` (a digest of the
cookie, which only a page of this origin can have been given) and come from this origin; a
request with a bearer token (the API) needs neither, since no other site can make a browser add
one. Requests that name a run, a locale or a file are answered 404 unless the name is one the
run's folder holds.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    Response,
    StreamingResponse,
)
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel, Field

from mailroom import campaign_runs, earlier_runs, operator_actions
from mailroom.addresses import mask
from mailroom.campaign_runs import RunFolder
from mailroom.delivery import report
from mailroom.delivery.outbox import Outbox
from mailroom.errors import MailroomError
from mailroom.run_record import APPROVAL_FILE
from mailroom.staging import RunStaging, is_url, local_path
from mailroom_airflow import settings
from mailroom_airflow.console import DAG_ID, URL_PREFIX

log = logging.getLogger(__name__)

CSRF_HEADER = "X-Mailroom-CSRF"
SESSION_COOKIE = "_token"  # Airflow's UI session (airflow.api_fastapi.auth.tokens)
NOT_SENT_ON_PAGE = 50
ACTIONS = {
    "halt": operator_actions.halt,
    "resume": operator_actions.resume,
    "resend-unknown": operator_actions.resend_unknown,
}
# The locale previews and Data Docs are shown in sandboxed frames: no script, no form, no
# plugin, no request to anywhere (images inline only), not even to this origin.
PREVIEW_POLICY = (
    "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "font-src data:; form-action 'none'; frame-ancestors 'self'; base-uri 'none'"
)
DOCS_POLICY = (
    "sandbox; default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "font-src 'self' data:; form-action 'none'; frame-ancestors 'self'; base-uri 'none'"
)
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; form-action 'self'; frame-ancestors 'self'; "
    "base-uri 'none'"
)

can_read = Depends(requires_access_dag("GET", DagAccessEntity.RUN))
can_edit = Depends(requires_access_dag("PUT", DagAccessEntity.RUN))
can_read_runs = Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID))

app = FastAPI(
    title="Mailroom campaign console",
    description="Watch, halt, resume and audit Mailroom campaign runs.",
    docs_url=None,
    redoc_url=None,
)
_templates = Environment(
    loader=PackageLoader("mailroom_airflow.console", "templates"),
    autoescape=select_autoescape(["html"]),
)
_STATIC = Path(__file__).with_name("static")


class ActionBody(BaseModel):
    """An operator's action: why (recorded with who and when), and that they confirmed it."""

    reason: str = Field(min_length=1, max_length=500)
    confirm: bool


# -- pages -------------------------------------------------------------------------------------


@app.get("/campaigns", response_class=HTMLResponse, dependencies=[can_read_runs])
def campaigns_page(request: Request, campaign: str = "", state: str = "") -> HTMLResponse:
    every = _run_list("", "")
    return _page(
        "campaigns.html",
        request,
        runs=[r for r in every if _matches(r, campaign, state)],
        campaigns=sorted({r["campaign"] for r in every}),
        states=campaign_runs.RUN_STATES,
        campaign=campaign,
        state=state,
    )


@app.get("/dags/{dag_id}/runs/{run_id}", response_class=HTMLResponse, dependencies=[can_read])
def run_page(request: Request, dag_id: str, run_id: str, user: GetUserDep) -> HTMLResponse:
    run = _run(dag_id, run_id)
    outbox = shared_outbox()
    staged = outbox.manifest_sha256(run.run_key) is not None
    history = outbox.actions(run.run_key) if staged else []
    return _page(
        "run.html",
        request,
        run=campaign_runs.run_overview(run, outbox),
        progress=campaign_runs.run_progress(run, outbox),
        approved=campaign_runs.approved_content(run),
        texts={
            loc: campaign_runs.preview(run, loc, "txt")
            for loc in campaign_runs.approved_content(run)["locales"]
        },
        history=history,
        not_sent=campaign_runs.not_sent_sample(run, outbox, NOT_SENT_ON_PAGE),
        not_sent_limit=NOT_SENT_ON_PAGE,
        action_label=operator_actions.action_label,
        quarantined=_quarantined(run),
        csrf=_csrf_token(request),
        can_edit=_allowed(user, "PUT"),
        dag_id=DAG_ID,
    )


@app.get(
    "/dags/{dag_id}/runs/{run_id}/preview/{locale}/{kind}",
    dependencies=[can_read],
)
def preview_page(dag_id: str, run_id: str, locale: str, kind: str) -> Response:
    """A locale's whole message as the approver saw it, in a sandbox (no script runs, nothing
    is fetched), the address and unsubscribe token masked."""
    run = _run(dag_id, run_id)
    text = campaign_runs.preview(run, locale, {"html": "html", "text": "txt"}.get(kind, ""))
    if text is None:
        raise HTTPException(404, "no such preview")
    media = "text/html" if kind == "html" else "text/plain"
    return Response(text, media_type=f"{media}; charset=utf-8", headers=_framed(PREVIEW_POLICY))


@app.get("/dags/{dag_id}/runs/{run_id}/data-docs/{check}/{rel:path}", dependencies=[can_read])
def data_docs(dag_id: str, run_id: str, check: str, rel: str) -> Response:
    """A file of a check's Great Expectations Data Docs, from the run's folder only."""
    run = _run(dag_id, run_id)
    root = _local_root(run)
    path = campaign_runs.data_docs_file(root, check, rel)
    if path is None:
        raise HTTPException(404, "no such Data Docs file")
    return FileResponse(path, headers=_framed(DOCS_POLICY))


@app.get("/dags/{dag_id}/runs/{run_id}/not-sent.csv", dependencies=[can_edit])
def not_sent_csv(dag_id: str, run_id: str, user: GetUserDep) -> StreamingResponse:
    """Who did not get the message and why, addresses in full: edit permission only. Those the
    provider bounced or dropped after accepting their request come last, with its reason."""
    run = _run(dag_id, run_id)
    outbox = shared_outbox()
    log.info("console: %s downloads the not-sent list of %s", user.get_name(), run.run_key)

    root = _local_root(run)
    staging = RunStaging(root)
    rows = report.not_sent_rows(
        run.run_key,
        outbox=outbox if outbox.manifest_sha256(run.run_key) is not None else None,
        approval=run.json(APPROVAL_FILE) or {},
        quarantine=staging.quarantine,
        left_out_rows=earlier_runs.left_out_parquet(staging),
    )

    def lines() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(report.NOT_SENT_COLUMNS)
        for row in rows:
            writer.writerow(row)
            if buffer.tell() > 64_000:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()

    name = f"{run.campaign}-{run.owner.get('folder', 'run')}-not-sent.csv"
    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",
        },
    )


@app.get("/static/{name}", dependencies=[can_read_runs])
def static(name: str) -> FileResponse:
    path = _STATIC / name
    if name not in {p.name for p in _STATIC.iterdir()}:
        raise HTTPException(404, "no such file")
    media = "text/css" if name.endswith(".css") else "application/javascript"
    return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})


# -- JSON API ----------------------------------------------------------------------------------


@app.get("/api/runs", dependencies=[can_read_runs])
def runs_api(campaign: str = "", state: str = "") -> list[dict[str, Any]]:
    return _run_list(campaign, state)


@app.get("/api/dags/{dag_id}/runs/{run_id}/progress", dependencies=[can_read])
def progress_api(dag_id: str, run_id: str) -> dict[str, Any]:
    return campaign_runs.run_progress(_run(dag_id, run_id), shared_outbox())


@app.post("/api/dags/{dag_id}/runs/{run_id}/actions/{action}", dependencies=[can_edit])
def action_api(
    request: Request, dag_id: str, run_id: str, action: str, body: ActionBody, user: GetUserDep
) -> JSONResponse:
    """Halt, resume or resend the unknown, with a reason, once confirmed; resume and resend then
    clear the run's send_shard and reconcile tasks through Airflow's REST API as this user."""
    _check_same_site(request)
    act = ACTIONS.get(action)
    run = _run(dag_id, run_id)
    if act is None:
        raise HTTPException(404, f"no action {action!r}")
    if not body.confirm:
        raise HTTPException(400, "the action was not confirmed")
    by = user.get_name()
    try:
        entry = act(
            shared_outbox(),
            run.run_key,
            by=by,
            reason=body.reason.strip(),
            run_root=_local_root(run),
        )
    except (MailroomError, ValueError) as exc:
        raise HTTPException(409, str(exc)) from exc
    log.info("console: %s by %s on %s: %s", action, by, run.run_key, body.reason.strip())
    cleared = None
    if action in ("resume", "resend-unknown"):
        if action == "resume":
            settings.lift_halt_variable(run.run_id)
        cleared = _clear_send_tasks(request, run.run_id)
    return JSONResponse({"action": entry, "cleared": cleared})


# -- helpers -----------------------------------------------------------------------------------


def _page(template: str, request: Request, **values: Any) -> HTMLResponse:
    html = _templates.get_template(template).render(
        prefix=URL_PREFIX, mask=mask, now=datetime.now(UTC), **values
    )
    return HTMLResponse(
        html, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-store"}
    )


def _framed(policy: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
    }


@lru_cache(maxsize=4)
def _outbox_at(url: str) -> Outbox:
    return Outbox(url)


def shared_outbox() -> Outbox:
    """The outbox of this Airflow's runs, opened once per process."""
    return _outbox_at(settings.outbox_url())


def _staging_root() -> Path:
    root = settings.staging_root()
    if is_url(root):
        raise HTTPException(
            501,
            "the staging root is on object storage; the console reads run folders from a local "
            "or mounted staging root",
        )
    return local_path(root)


def _run(dag_id: str, run_id: str) -> RunFolder:
    if dag_id != DAG_ID:
        raise HTTPException(404, f"the campaign console shows runs of {DAG_ID} only")
    run = campaign_runs.find_run(_staging_root(), run_id)
    if run is None:
        raise HTTPException(404, "no such run")
    return run


def _local_root(run: RunFolder) -> Path:
    return Path(run.folder.where)


def _run_list(campaign: str, state: str) -> list[dict[str, Any]]:
    outbox = shared_outbox()
    runs = [campaign_runs.run_overview(r, outbox) for r in campaign_runs.find_runs(_staging_root())]
    runs = [r for r in runs if _matches(r, campaign, state)]
    return sorted(runs, key=lambda r: r["started_at"] or "", reverse=True)


def _matches(run: dict[str, Any], campaign: str, state: str) -> bool:
    return (not campaign or run["campaign"] == campaign) and (not state or run["state"] == state)


def _quarantined(run: RunFolder) -> dict[str, int]:
    """How many rows validation quarantined, per reason (column-wise: no row is read out)."""
    path = RunStaging(_local_root(run)).quarantine
    if not path.exists():
        return {}
    import pyarrow.parquet as pq

    counts = pq.read_table(path, columns=["reason"]).column("reason").value_counts()
    return {str(c["values"]): int(c["counts"]) for c in counts.to_pylist()}


def _allowed(user: Any, method: Literal["GET", "PUT"]) -> bool:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    return bool(
        get_auth_manager().is_authorized_dag(
            method=method,
            access_entity=DagAccessEntity.RUN,
            details=DagDetails(id=DAG_ID),
            user=user,
        )
    )


def _csrf_token(request: Request) -> str:
    cookie = request.cookies.get(SESSION_COOKIE) or ""
    return (
        hashlib.sha256(b"mailroom-console-csrf\0" + cookie.encode()).hexdigest() if cookie else ""
    )


def _check_same_site(request: Request) -> None:
    """Refuse a cookie-authenticated action a page of another site could have made."""
    if request.headers.get("authorization", "").lower().startswith("bearer "):
        return
    expected = _csrf_token(request)
    given = request.headers.get(CSRF_HEADER, "")
    if not expected or not hmac.compare_digest(given, expected):
        raise HTTPException(403, f"missing or wrong {CSRF_HEADER} header: reload the page")
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin and urlsplit(origin).netloc != request.url.netloc:
        raise HTTPException(403, "a request from another site")


def _api_server_root() -> str:
    """This API server as it listens (``[api] port``, TLS when ``[api] ssl_cert`` is set), not
    the address the browser used: behind a proxy or a published port that one may not reach
    back here."""
    from airflow.configuration import conf

    scheme = "https" if conf.get("api", "ssl_cert", fallback="") else "http"
    return f"{scheme}://127.0.0.1:{conf.getint('api', 'port', fallback=8080)}"


def _clear_send_tasks(request: Request, run_id: str) -> dict[str, Any]:
    """Clear the run's send_shard and reconcile tasks through Airflow's REST API, as the user
    who asked (Airflow checks their permission again)."""
    auth = request.headers.get("authorization")
    if not auth:
        auth = f"Bearer {request.cookies.get(SESSION_COOKIE, '')}"
    base = _api_server_root()
    try:
        answer = httpx.post(
            f"{base}/api/v2/dags/{DAG_ID}/clearTaskInstances",
            json={
                "dag_run_id": run_id,
                "task_ids": ["send_shard", "reconcile"],
                "only_failed": False,
                "reset_dag_runs": True,
                "dry_run": False,
            },
            headers={"Authorization": auth},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        return {"ok": False, "error": f"Airflow did not answer: {exc.__class__.__name__}"}
    if answer.status_code != 200:
        return {"ok": False, "error": f"Airflow answered {answer.status_code}: {answer.text[:300]}"}
    tasks = answer.json().get("task_instances") or []
    return {"ok": True, "tasks": len(tasks)}
