"""mailroom_campaign: one DAG run sends one campaign, one recipient per envelope.

extract → validate ┐
render ────────────┴→ build → freeze → gate → canary → summarise → approve → guard × shards
                                                                    → send × shards → reconcile
"""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from mailroom_airflow import stages
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
    },
)
def mailroom_campaign() -> None:
    @task
    def prepare() -> dict:
        ctx = get_current_context()
        p = ctx["params"]
        return stages.prepare(p["campaign"], p["dry_run"], int(p["shards"]), ctx["run_id"])

    @task
    def extract_audience(prepared: dict) -> dict:
        return stages.extract(prepared)

    @task
    def validate_audience(prepared: dict, _extracted: dict) -> dict:
        return stages.validate(prepared)

    @task
    def render_content(prepared: dict) -> dict:
        return stages.render(prepared)

    @task
    def build_envelopes(prepared: dict, _validated: dict, _rendered: dict) -> dict:
        return stages.build(prepared)

    @task
    def freeze_batches(prepared: dict, _built: dict) -> dict:
        return stages.freeze(prepared)

    @task
    def check_envelopes(prepared: dict, _frozen: dict) -> dict:
        return stages.gate(prepared)

    @task
    def canary_send(prepared: dict, _checked: dict) -> dict:
        return stages.canary(prepared)

    @task
    def summarise(prepared: dict, _canary: dict) -> str:
        return stages.summarise(prepared, get_current_context()["dag_run"].triggering_user_name)

    @task
    def plan_shards(frozen: dict) -> list[int]:
        return list(frozen["shards"])

    @task(retries=1, map_index_template="{{ shard_label }}")
    def guard_shard(prepared: dict, frozen: dict, shard: int) -> dict:
        get_current_context()["shard_label"] = f"shard {shard + 1} of {len(frozen['shards'])}"
        return stages.guard(prepared, frozen, shard)

    @task(retries=2, map_index_template="{{ shard_label }}", pool="mailroom_send")
    def send_shard(prepared: dict, frozen: dict, shard: int) -> dict:
        get_current_context()["shard_label"] = f"shard {shard + 1} of {len(frozen['shards'])}"
        return stages.send(prepared, frozen, shard)

    @task(trigger_rule="all_done")
    def reconcile(prepared: dict) -> dict:
        return stages.reconcile(prepared)

    prepared = prepare()
    validated = validate_audience(prepared, extract_audience(prepared))
    built = build_envelopes(prepared, validated, render_content(prepared))
    frozen = freeze_batches(prepared, built)
    summary = summarise(prepared, canary_send(prepared, check_envelopes(prepared, frozen)))
    approve = CampaignApprovalOperator(
        task_id="approve",
        prepare_task_id="prepare",
        subject="Send campaign {{ ti.xcom_pull(task_ids='prepare')['campaign'] }}?",
        body="{{ ti.xcom_pull(task_ids='summarise') }}",
    )
    shards = plan_shards(frozen)
    guarded = guard_shard.partial(prepared=prepared, frozen=frozen).expand(shard=shards)
    sent = send_shard.partial(prepared=prepared, frozen=frozen).expand(shard=shards)
    summary >> approve >> guarded >> sent
    sent >> reconcile(prepared)


mailroom_campaign()
