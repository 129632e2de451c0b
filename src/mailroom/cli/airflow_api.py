"""A small client for Airflow's REST API (v2), authenticating as one person.

Used by the demo and the operator/approver commands; it speaks HTTP only, so the domain package
stays free of Airflow imports.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import requests

from mailroom.errors import MailroomError


class AirflowApiError(MailroomError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AirflowApi:
    def __init__(self, base_url: str, username: str, password: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self._password = password
        self.timeout = timeout
        self._session = requests.Session()
        self._token: str | None = None

    def login(self) -> None:
        response = self._session.post(
            f"{self.base_url}/auth/token",
            json={"username": self.username, "password": self._password},
            timeout=self.timeout,
        )
        if response.status_code not in (200, 201):
            raise AirflowApiError(
                f"login as {self.username!r} refused ({response.status_code})", response.status_code
            )
        self._token = response.json()["access_token"]

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._token is None:
            self.login()
        response = self._session.request(
            method,
            f"{self.base_url}/api/v2{path}",
            headers={"Authorization": f"Bearer {self._token}"},
            timeout=self.timeout,
            **kwargs,
        )
        if response.status_code == 401:
            self.login()
            return self.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise AirflowApiError(
                f"{method} {path} answered {response.status_code}: {response.text[:300]}",
                response.status_code,
            )
        return response.json() if response.content else None

    # DAGs and runs ---------------------------------------------------------------------------
    def dag(self, dag_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/dags/{dag_id}")
        return result

    def dag_exists(self, dag_id: str) -> bool:
        """Whether the DAG has been parsed yet (404 until the dag-processor has seen it)."""
        try:
            self.dag(dag_id)
            return True
        except AirflowApiError as exc:
            if exc.status == 404:
                return False
            raise

    def unpause(self, dag_id: str) -> None:
        self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        run = self.request(
            "POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf}
        )
        return str(run["dag_run_id"])

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}"
        )
        return result

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        data = self.request(
            "GET",
            f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances",
            params={"limit": 1000},
        )
        return list(data["task_instances"])

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> Any:
        data = self.request(
            "GET",
            f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}"
            f"/xcomEntries/return_value",
            params={"map_index": map_index, "deserialize": True, "stringify": False},
        )
        return data["value"]

    # human-in-the-loop ----------------------------------------------------------------------
    def pending_approvals(self) -> list[dict[str, Any]]:
        data = self.request(
            "GET",
            "/dags/~/dagRuns/~/hitlDetails",
            params={"response_received": False, "limit": 1000},
        )
        return list(data.get("hitl_details", []))

    def answer(
        self, dag_id: str, run_id: str, task_id: str, option: str, map_index: int = -1
    ) -> Any:
        return self.request(
            "PATCH",
            f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}"
            f"/{map_index}/hitlDetails",
            json={"chosen_options": [option], "params_input": {}},
        )

    def wait_until(self, what: str, check: Any, timeout: float, interval: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AirflowApiError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(interval)
