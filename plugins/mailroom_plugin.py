"""Mailroom's Airflow plugin: what Mailroom adds to Airflow itself.

- The campaign console (``mailroom_airflow.console``): its FastAPI app on the API server, a
  *Campaigns* entry in the navigation, and a *Campaign* tab on every run of the DAG.
- A listener (``mailroom_airflow.run_notes``) that writes each finished campaign run's outcome
  into the DAG run's note, so a rejected or timed-out run does not pass for a green one.

Airflow imports every module of this folder by its file name, so this is the only module here;
the adapters it and the DAG use live in the installed package ``mailroom_airflow``.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from mailroom_airflow import run_notes
from mailroom_airflow.console import CAMPAIGNS_ROUTE, RUN_ROUTE, URL_PREFIX


class _Console:
    """The console's ASGI app, imported on its first request. Every Airflow process loads this
    plugin (a task process does, for listeners and macros), and the app pulls in Airflow's API
    server security, pandas and the outbox: about a second that only the API server needs."""

    @property
    def app(self) -> Any:
        from mailroom_airflow.console.app import app

        return app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class MailroomPlugin(AirflowPlugin):
    name = "mailroom"
    fastapi_apps = [  # noqa: RUF012 - Airflow's plugin interface
        {"app": _Console(), "url_prefix": URL_PREFIX, "name": "Mailroom campaign console"}
    ]
    external_views = [  # noqa: RUF012
        {
            "name": "Campaigns",
            "href": f"{URL_PREFIX}/campaigns",
            "destination": "nav",
            "url_route": CAMPAIGNS_ROUTE,
        },
        {
            "name": "Campaign",
            "href": f"{URL_PREFIX}/dags/{{DAG_ID}}/runs/{{RUN_ID}}",
            "destination": "dag_run",
            "url_route": RUN_ROUTE,
        },
    ]
    listeners = [run_notes]  # noqa: RUF012
