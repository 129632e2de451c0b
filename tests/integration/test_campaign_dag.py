"""The whole DAG through ``dag.test()``, with an approver answering from another thread."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailroom.audience.sample import SampleAudience, generate
from mailroom.staging import RunStaging
from sendgrid_dev import SendGridDevServer, accepted_recipients
from support.airflow_env import REPO, set_connections, set_variables

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
DAG_ID = "mailroom_campaign"


@pytest.fixture(scope="module")
def audience(tmp_path_factory: pytest.TempPathFactory) -> SampleAudience:
    return generate(tmp_path_factory.mktemp("users") / "users.sqlite", users=2500)


@pytest.fixture(scope="module")
def staging_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("staging")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SendGridDevServer]:
    with SendGridDevServer(data_dir=tmp_path / "sendgrid-dev", api_key="SG.integration") as srv:
        yield srv


@pytest.fixture
def dag(
    airflow_db: None, audience: SampleAudience, staging_root: Path, server: SendGridDevServer
) -> Any:
    set_connections(
        mailroom_users={"conn_type": "sqlite", "host": str(audience.path)},
        mailroom_sendgrid={"conn_type": "http", "host": server.url, "password": "SG.integration"},
    )
    set_variables(
        mailroom_staging_root=str(staging_root), mailroom_unsubscribe_secret="integration"
    )
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    assert bag.captured_warnings == {}
    # Resolve every ORM mapper here: the approver thread must not trigger imports of its own.
    import airflow.models
    import airflow.models.hitl  # noqa: F401
    from sqlalchemy.orm import configure_mappers

    configure_mappers()
    return bag.dags[DAG_ID]


class Approver(threading.Thread):
    """Answers the approval the way Airflow's REST handler does, once the task is parked."""

    def __init__(self, option: str, who: str = "approver") -> None:
        super().__init__(daemon=True)
        self.option, self.who = option, who
        self.answered = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._answer_when_parked()
        except BaseException as exc:
            self.error = exc
            raise

    def _answer_when_parked(self) -> None:
        from airflow.models.hitl import HITLDetail
        from airflow.models.taskinstance import TaskInstance
        from airflow.models.trigger import handle_event_submit
        from airflow.sdk import timezone
        from airflow.triggers.base import TriggerEvent
        from airflow.utils.session import create_session
        from airflow.utils.state import TaskInstanceState
        from sqlalchemy import select

        while not self.stop.is_set():
            with create_session() as session:
                ti = session.scalars(
                    select(TaskInstance).where(
                        TaskInstance.dag_id == DAG_ID,
                        TaskInstance.task_id == "approve",
                        TaskInstance.state == TaskInstanceState.AWAITING_INPUT,
                    )
                ).first()
                if ti is not None:
                    time.sleep(2)  # Airflow 3.3.2 can fail a HITL task answered right after parking
                    detail = session.scalars(
                        select(HITLDetail).where(HITLDetail.ti_id == ti.id)
                    ).one()
                    assert {u["id"] for u in detail.assignees or []} == {"approver"}
                    detail.responded_by = {"id": self.who, "name": self.who}
                    detail.responded_at = timezone.utcnow()
                    detail.chosen_options = [self.option]
                    detail.params_input = {}
                    session.add(detail)
                    handle_event_submit(
                        TriggerEvent(detail.as_resume_event_payload()),
                        task_instance=ti,
                        session=session,
                    )
                    self.answered.set()
                    return
            time.sleep(0.5)


def run_dag(dag: Any, option: str) -> Any:
    approver = Approver(option)
    approver.start()
    try:
        dag_run = dag.test(run_conf={"campaign": "winter_update", "shards": 2, "dry_run": False})
    finally:
        approver.stop.set()
        approver.join(timeout=10)
    assert approver.error is None, f"the approver failed: {approver.error!r}"
    assert approver.answered.is_set()
    return dag_run


def report_of(staging_root: Path, run_id: str) -> dict[str, Any]:
    path = RunStaging.for_run(staging_root, "winter_update", run_id).report
    return dict(json.loads(path.read_text()))


def test_approved_run_sends_every_recipient_exactly_once(
    dag: Any, audience: SampleAudience, staging_root: Path, server: SendGridDevServer
) -> None:
    dag_run = run_dag(dag, "Approve")
    assert dag_run.state == "success"
    received = Counter(e.lower() for e in accepted_recipients(server.accepted()))
    assert set(received) == audience.expected
    assert max(received.values()) == 1
    report = report_of(staging_root, dag_run.run_id)
    assert report["status"] == "sent"
    assert report["approval"]["decision"] == "approved"
    assert report["approval"]["by"] == "approver"
    assert report["balanced"] is True
    assert report["outbox"]["sent"]["recipients"] == len(audience.expected)


def test_rejected_run_sends_nothing_and_says_so(
    dag: Any, staging_root: Path, server: SendGridDevServer
) -> None:
    dag_run = run_dag(dag, "Reject")
    assert server.stats().received == 0
    report = report_of(staging_root, dag_run.run_id)
    assert report["status"] == "rejected"
    assert report["approval"] == {
        "decision": "rejected",
        "by": "approver",
        "at": report["approval"]["at"],
    }
    assert report["outbox"]["sent"]["recipients"] == 0
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["guard_shard"] == "skipped"
    assert states["send_shard"] == "skipped"
