"""The DAG file parses, wires what DESIGN.md says, and touches no connection while parsing."""

from __future__ import annotations

import itertools
from pathlib import Path
from unittest import mock

import pytest

pytestmark = pytest.mark.dag
REPO = Path(__file__).resolve().parents[2]


def _dagbag():  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


@pytest.fixture(scope="module")
def dag():  # type: ignore[no-untyped-def]
    bag = _dagbag()
    assert bag.import_errors == {}
    return bag.dags["mailroom_campaign"]


def test_only_the_campaign_dag_is_defined() -> None:
    bag = _dagbag()
    assert bag.import_errors == {}
    # DagBag records a DAG file's warnings (deprecations included) here and re-emits them as
    # UserWarnings, so pyproject's filterwarnings would never see them.
    assert bag.captured_warnings == {}
    assert set(bag.dag_ids) == {"mailroom_campaign"}


def test_parsing_fetches_no_connection_and_no_variable() -> None:
    from airflow.sdk import Connection, Variable
    from airflow.sdk.bases.hook import BaseHook

    with (
        mock.patch.object(
            BaseHook, "get_connection", side_effect=AssertionError("connection")
        ) as hook,
        mock.patch.object(Connection, "get", side_effect=AssertionError("connection")) as conn,
        mock.patch.object(Variable, "get", side_effect=AssertionError("variable")) as var,
    ):
        bag = _dagbag()
    assert bag.import_errors == {}
    assert not hook.called
    assert not conn.called
    assert not var.called


def test_stages_run_in_design_order(dag) -> None:  # type: ignore[no-untyped-def]
    order = [
        "prepare",
        "extract_audience",
        "validate_audience",
        "build_envelopes",
        "freeze_batches",
        "check_envelopes",
        "canary_send",
        "summarise",
        "approve",
        "guard_shard",
        "send_shard",
        "reconcile",
    ]
    for upstream, downstream in itertools.pairwise(order):
        assert upstream in dag.get_task(downstream).upstream_task_ids or any(
            upstream in dag.get_task(t).get_flat_relative_ids(upstream=True)
            for t in dag.get_task(downstream).upstream_task_ids
        ), f"{upstream} must run before {downstream}"
    assert "render_content" in dag.get_task("build_envelopes").upstream_task_ids


def test_nothing_sends_without_the_approval_gate(dag) -> None:  # type: ignore[no-untyped-def]
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    approve = dag.get_task("approve")
    assert isinstance(approve, ApprovalOperator)
    assert approve.defaults == ["Reject"], "a timeout must count as Reject"
    assert dag.get_task("guard_shard").upstream_task_ids >= {"approve"}
    # Every request of the run passes the guard before any shard sends.
    assert dag.get_task("send_shard").upstream_task_ids >= {"guard_shard"}
    assert approve.upstream_task_ids == {"summarise"}


# The tasks that retry, and how often; every other task runs once (default_args retries 0).
RETRIES = {
    "guard_shard": 1,
    "send_shard": 2,  # a killed worker's shard is retried on another (README: `send_shard` has 2)
}


def test_policy_owner_retries_tags(dag) -> None:  # type: ignore[no-untyped-def]
    assert set(dag.tags) == {"mailroom"}
    assert {task.task_id: task.owner for task in dag.tasks} == dict.fromkeys(
        dag.task_ids, "mailroom"
    )
    assert {task.task_id: task.retries for task in dag.tasks} == {
        task_id: RETRIES.get(task_id, 0) for task_id in dag.task_ids
    }
    assert dag.get_task("send_shard").pool == "mailroom_send", "send shards run in their pool"
    assert dag.get_task("reconcile").trigger_rule == "all_done"


def test_trigger_form_offers_the_campaign_specs(dag) -> None:  # type: ignore[no-untyped-def]
    specs = sorted(p.stem for p in (REPO / "include" / "campaigns").glob("*.yaml"))
    param = dag.params.get_param("campaign")
    assert param.schema["enum"] == specs
    assert dag.params.get_param("shards").schema["maximum"] <= 1024
