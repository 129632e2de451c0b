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
