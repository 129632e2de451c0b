"""The campaign console's routes, as the plugin mounts them: every one behind Airflow's own DAG
permission (read to see; edit to act and to download addresses), and the plugin registers the
app, both views and the run-note listener."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from fastapi.routing import APIRoute

pytestmark = pytest.mark.dag

# Routes that change a run or show full addresses: edit permission.
EDITS = {
    "/api/dags/{dag_id}/runs/{run_id}/actions/{action}",
    "/dags/{dag_id}/runs/{run_id}/not-sent.csv",
}


def _dag_permissions(route: APIRoute) -> list[str]:
    """The methods of every ``requires_access_dag`` dependency of a route."""
    found = []
    pending = list(route.dependant.dependencies)
    while pending:
        dep = pending.pop()
        pending.extend(dep.dependencies)
        call: Any = dep.call
        if call is not None and "requires_access_dag" in getattr(call, "__qualname__", ""):
            found.append(inspect.getclosurevars(call).nonlocals["method"])
    return found


def test_every_console_route_needs_the_dags_permission() -> None:
    from mailroom_airflow.console.app import app

    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    assert len(routes) >= 9
    for route in routes:
        methods = _dag_permissions(route)
        assert methods, f"{route.path} is served without Airflow's DAG permission"
        wanted = "PUT" if route.path in EDITS else "GET"
        assert methods == [wanted], (route.path, methods)


def test_the_plugin_registers_the_console_its_views_and_the_run_notes() -> None:
    import importlib.util

    from mailroom_airflow import run_notes
    from mailroom_airflow.console.app import app
    from support.airflow_env import REPO

    spec = importlib.util.spec_from_file_location(
        "mailroom_plugin", REPO / "plugins" / "mailroom_plugin.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugin = module.MailroomPlugin
    assert [a["app"].app for a in plugin.fastapi_apps] == [app]
    assert {(v["destination"], v["url_route"]) for v in plugin.external_views} == {
        ("nav", "campaigns"),
        ("dag_run", "campaign"),
    }
    assert plugin.listeners == [run_notes]


# -- what the run's page, its progress and its download show ------------------------------------

CAMPAIGN = "winter_update"
RUN_ID = "manual__2026-12-06T10:00:00+00:00"
RUN_KEY = f"{CAMPAIGN}/{RUN_ID}"
BOUNCE = "550 5.1.1 <en-1@example.com>: Recipient address rejected: User unknown"


class _User:
    def get_name(self) -> str:
        return "operator"


@pytest.fixture
def console(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The console's app on a run of two requests (en, de) both sent, then SendGrid's events:
    the signed-in user may read and edit; the outbox and the staging root are the test's."""
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.testclient import TestClient

    from mailroom.delivery.outbox import BatchState, Outbox, StagedBatch
    from mailroom.staging import run_folder_name, write_json
    from mailroom_airflow.console import app as console_app
    from support.provider_events import event, record

    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    batches = [StagedBatch("en-0", 0, "en", "0" * 64, 3), StagedBatch("de-1", 1, "de", "1" * 64, 2)]
    people = [
        *((f"en-{n}@example.com", f"u-en-{n}", "en-0") for n in range(3)),
        *((f"de-{n}@example.com", f"u-de-{n}", "de-1") for n in range(2)),
    ]
    outbox.stage(RUN_KEY, "f" * 64, batches, people)
    assert outbox.claim(RUN_KEY, "en-0")
    outbox.finish(RUN_KEY, "en-0", BatchState.SENT, message_id="msg-en-0")
    assert outbox.claim(RUN_KEY, "de-1")
    outbox.finish(RUN_KEY, "de-1", BatchState.UNKNOWN, error="the answer was lost")
    record(
        outbox,
        event(RUN_KEY, "en-0", "en-0@example.com", "delivered"),
        event(RUN_KEY, "en-0", "en-1@example.com", "bounce", reason=BOUNCE),
        event(RUN_KEY, "en-0", "en-2@example.com", "dropped", reason="Bounced Address"),
        event(RUN_KEY, "de-1", "de-0@example.com", "delivered"),  # settles de-1 as sent
        event(RUN_KEY, "de-1", "de-0@example.com", "spamreport"),
    )
    root = tmp_path / "staging"
    folder = root / CAMPAIGN / run_folder_name(RUN_ID)
    write_json(
        folder / "run.json",
        {"campaign": CAMPAIGN, "run_id": RUN_ID, "folder": folder.name, "shards": 1},
    )
    write_json(folder / "approval.json", {"decision": "approved", "by": "approver", "at": "T"})

    monkeypatch.setattr(console_app, "shared_outbox", lambda: outbox)
    monkeypatch.setattr(console_app, "_staging_root", lambda: root)
    monkeypatch.setattr(console_app, "_allowed", lambda user, method: True)
    app = console_app.app
    for dependency in (console_app.can_read, console_app.can_edit, console_app.can_read_runs):
        app.dependency_overrides[dependency.dependency] = lambda: None
    app.dependency_overrides[get_user] = _User
    try:
        yield TestClient(app)
    finally:
        app.dependency_overrides.clear()
        outbox.dispose()


def _run_path() -> str:
    from urllib.parse import quote

    return f"/dags/mailroom_campaign/runs/{quote(RUN_ID, safe='')}"


def test_the_progress_api_gives_what_the_provider_reported_per_locale(console: Any) -> None:
    answer = console.get(f"/api{_run_path()}/progress")
    assert answer.status_code == 200, answer.text
    feedback = answer.json()["delivery_feedback"]
    zero = {"delivered": 0, "bounced": 0, "dropped": 0, "complained": 0, "unsubscribed": 0}
    assert feedback["per_locale"] == {
        "de": {**zero, "delivered": 1, "complained": 1},
        "en": {**zero, "delivered": 1, "bounced": 1, "dropped": 1},
    }
    assert feedback["total"] == {
        "delivered": 2,
        "bounced": 1,
        "dropped": 1,
        "complained": 1,
        "unsubscribed": 0,
    }
    assert feedback["in_equation"] is False
    assert answer.json()["sent"] == 5  # the bounced and dropped were accepted: sent


def test_the_run_page_shows_the_providers_outcomes_its_reasons_masked_and_the_settlement(
    console: Any,
) -> None:
    import re

    answer = console.get(_run_path())
    assert answer.status_code == 200, answer.text
    page = answer.text
    assert "After the provider accepted it" in page
    table = page[
        page.index('data-table="feedback"') : page.index(
            "</table>", page.index('data-table="feedback"')
        )
    ]
    cells = re.findall(r'<tr data-row="([^"]+)">(.*?)</tr>', table, re.S)
    shown = {row: re.findall(r'data-outcome="(\w+)">([\d,]+)<', body) for row, body in cells}
    assert shown["en"] == [
        ("delivered", "1"),
        ("bounced", "1"),
        ("dropped", "1"),
        ("complained", "0"),
        ("unsubscribed", "0"),
    ]
    assert shown["de"][0] == ("delivered", "1")
    assert shown["total"] == [
        ("delivered", "2"),
        ("bounced", "1"),
        ("dropped", "1"),
        ("complained", "1"),
        ("unsubscribed", "0"),
    ]
    # Who did not get it: the bounced and dropped with the provider's reason, masked.
    assert "<td>u-en-1</td><td>e***@example.com</td><td>en-0</td><td>bounced</td>" in page
    assert "550 5.1.1 &lt;e***@example.com&gt;: Recipient address rejected" in page
    assert "<td>dropped</td><td>Bounced Address</td>" in page
    assert "@example.com" not in page.replace("***@example.com", "")
    # The history names the settlement the events made.
    assert '<td data-action-name="settle_by_events">settled from SendGrid&#39;s events</td>' in (
        page
    )


def test_the_not_sent_download_ends_with_the_bounced_and_dropped_and_their_reasons(
    console: Any,
) -> None:
    import csv
    import io

    answer = console.get(f"{_run_path()}/not-sent.csv")
    assert answer.status_code == 200, answer.text
    rows = list(csv.reader(io.StringIO(answer.text)))
    assert rows == [
        ["user_id", "email", "state", "reason"],
        ["u-en-1", "en-1@example.com", "bounced", BOUNCE],
        ["u-en-2", "en-2@example.com", "dropped", "Bounced Address"],
    ]
