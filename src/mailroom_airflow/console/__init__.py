"""The campaign console: Mailroom's pages inside the Airflow UI.

``app`` is a FastAPI app the plugin (``plugins/mailroom_plugin.py``) mounts on Airflow's API
server under ``URL_PREFIX``; the plugin's external views put its pages into Airflow's navigation
(``Campaigns``) and onto each run of the DAG (``Campaign``). This module holds only the names the
plugin, the approval task and the tests share, so importing it loads nothing.
"""

from __future__ import annotations

from urllib.parse import quote

DAG_ID = "mailroom_campaign"
URL_PREFIX = "/mailroom"
# Airflow's UI shows an external view at /plugin/<url_route> (nav) and
# /dags/<dag>/runs/<run>/plugin/<url_route> (a DAG run's tab).
CAMPAIGNS_ROUTE = "campaigns"
RUN_ROUTE = "campaign"


def run_page(run_id: str) -> str:
    """The console's own page of a run, under the API server's root."""
    return f"{URL_PREFIX}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"


def run_view_in_airflow(base_url: str, run_id: str) -> str:
    """The run's console tab inside Airflow's UI, as the approval page links to it."""
    return f"{base_url.rstrip('/')}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/plugin/{RUN_ROUTE}"
