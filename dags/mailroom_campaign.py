"""mailroom_campaign: one DAG run sends one campaign, one recipient per envelope.

```
prepare → extract_audience → validate_audience ┐
        → render_content ──────────────────────┴→ build_envelopes → freeze_batches
    → check_envelopes → canary_send → summarise → approve → guard_shard × N → send_shard × N
    → reconcile
```

Each task calls the function of the same name in ``mailroom_airflow.tasks``, which calls the one
in ``mailroom.pipeline``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import Param, chain, dag, get_current_context, task

from mailroom_airflow import tasks
from mailroom_airflow.approval import CampaignApprovalOperator

_CAMPAIGNS_DIR = Path(os.environ.get("MAILROOM_INCLUDE_DIR", Path(__file__).parents[1] / "include"))
# A folder listing (no connection, no data) so the trigger form offers the campaigns as a list.
CAMPAIGNS = sorted(p.stem for p in (_CAMPAIGNS_DIR / "campaigns").glob("*.yaml"))


@dag(
    dag_id="mailroom_campaign",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=2,
    tags=["mailroom"],
    doc_md=__doc__,
    default_args={"owner": "mailroom", "retries": 0},
    params={
        "campaign": Param(
            CAMPAIGNS[0] if CAMPAIGNS else "",
            type="string",
            enum=CAMPAIGNS or None,
            description="Campaign spec from include/campaigns/",
        ),
        "dry_run": Param(
            False,
            type="boolean",
            description="Write the approved requests to files instead of sending",
        ),
        "shards": Param(
            4,
            type="integer",
            minimum=1,
            maximum=256,
            description="Parallel send tasks (each owns a fixed slice of the batches)",
        ),
        "resend_to_earlier_recipients": Param(
            False,
            type="boolean",
            description="Send again to people an earlier run of this campaign sent to (or "
            "whose outcome is unknown); they are left out otherwise. Needs a resend_reason",
        ),
        "resend_reason": Param(
            "",
            type="string",
            maxLength=500,
            description="Why they should get it again (required with the option above; shown "
            "to the approver and kept with the run)",
        ),
    },
)
def mailroom_campaign() -> None:
    @task
    def prepare() -> dict[str, Any]:
        ctx = get_current_context()
        p = ctx["params"]
        resend = tasks.resend_choice(p)  # before anything is written: a bad choice fails here
        return {
            **tasks.prepare(
                p["campaign"],
                p["dry_run"],
                int(p["shards"]),
                ctx["run_id"],
                triggered_by=ctx["dag_run"].triggering_user_name,
            ),
            "resend": resend,
        }

    @task
    def extract_audience(prepared: dict[str, Any]) -> dict[str, Any]:
        return tasks.extract_audience(prepared)

    @task
    def validate_audience(prepared: dict[str, Any]) -> dict[str, Any]:
        return tasks.validate_audience(prepared)

    @task
    def render_content(prepared: dict[str, Any]) -> dict[str, Any]:
        return tasks.render_content(prepared)

    @task
    def build_envelopes(prepared: dict[str, Any]) -> dict[str, Any]:
        return tasks.build_envelopes(prepared)

    @task
    def freeze_batches(prepared: dict[str, Any]) -> dict[str, Any]:
        return tasks.freeze_batches(prepared)

    @task
    def check_envelopes(prepared: dict[str, Any]) -> dict[str, Any]:
        return tasks.check_envelopes(prepared)

    @task
    def canary_send(prepared: dict[str, Any]) -> dict[str, Any]:
        return tasks.canary_send(prepared)

    @task
    def summarise(prepared: dict[str, Any]) -> str:
        return tasks.summarise(prepared, get_current_context()["dag_run"].triggering_user_name)

    @task
    def plan_shards(frozen: dict[str, Any]) -> list[int]:
        return list(frozen["shards"])

    @task(retries=1, map_index_template="{{ shard_label }}")
    def guard_shard(prepared: dict[str, Any], frozen: dict[str, Any], shard: int) -> dict[str, Any]:
        get_current_context()["shard_label"] = f"shard {shard + 1} of {len(frozen['shards'])}"
        return tasks.guard_shard(prepared, frozen, shard)

    # A shard whose try raised or whose process was killed is retried after the campaign's
    # send_retry_delay_seconds: Airflow takes retry_delay from this file, not per run, so the
    # task gets a one-second floor and its next try waits the rest (tasks.send_shard).
    @task(
        retries=2,
        retry_delay=timedelta(seconds=1),
        map_index_template="{{ shard_label }}",
        pool="mailroom_send",
    )
    def send_shard(prepared: dict[str, Any], frozen: dict[str, Any], shard: int) -> dict[str, Any]:
        get_current_context()["shard_label"] = f"shard {shard + 1} of {len(frozen['shards'])}"
        return tasks.send_shard(prepared, frozen, shard)

    @task(trigger_rule="all_done")
    def reconcile(prepared: dict[str, Any]) -> dict[str, Any]:
        return tasks.reconcile(prepared)

    prepared = prepare()
    frozen = freeze_batches(prepared)
    shards = plan_shards(frozen)
    approve = CampaignApprovalOperator(
        task_id="approve",
        prepare_task_id="prepare",
        subject="Send campaign {{ ti.xcom_pull(task_ids='prepare')['campaign'] }}?",
        body="{{ ti.xcom_pull(task_ids='summarise') }}",
    )
    built = build_envelopes(prepared)
    chain(extract_audience(prepared), validate_audience(prepared), built)
    chain(render_content(prepared), built)
    chain(
        built,
        frozen,
        check_envelopes(prepared),
        canary_send(prepared),
        summarise(prepared),
        approve,
        guard_shard.partial(prepared=prepared, frozen=frozen).expand(shard=shards),
        send_shard.partial(prepared=prepared, frozen=frozen).expand(shard=shards),
        reconcile(prepared),
    )


mailroom_campaign()
