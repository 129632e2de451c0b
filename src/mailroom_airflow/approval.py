"""The approval gate: Airflow's ApprovalOperator, with approvers resolved when the run starts.

Approvers come from the run's campaign (so they cannot be known while the DAG file is parsed):
the campaign spec, overridden by the Variable ``mailroom_approvers__<campaign>``, minus the user
who triggered the run: nobody approves their own send.

The body is the run's approval summary (``mailroom.approval.summary``): how many an earlier run
of the campaign already sent to were left out, and why. A run triggered to send to them again
says so in the subject as well, with the trigger's reason first in the body, so no approver
answers it as an ordinary send.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator

from mailroom.errors import MailroomError
from mailroom_airflow import settings, tasks


class CampaignApprovalOperator(ApprovalOperator):
    def __init__(self, *, prepare_task_id: str, **kwargs: Any) -> None:
        kwargs.setdefault("defaults", ApprovalOperator.REJECT)  # a timeout counts as Reject
        kwargs.setdefault("response_timeout", timedelta(hours=24))
        super().__init__(**kwargs)
        self.prepare_task_id = prepare_task_id

    def execute(self, context: Any) -> Any:
        prepared = context["ti"].xcom_pull(task_ids=self.prepare_task_id)
        tasks.check_not_answered(prepared)  # a run already answered is not asked again
        campaign = prepared["campaign"]
        triggering_user = getattr(context["dag_run"], "triggering_user_name", None)
        eligible = [
            user
            for user in settings.approvers(campaign, list(prepared["approvers"]))
            if user != triggering_user
        ]
        if not eligible:
            raise MailroomError(
                f"no eligible approver for campaign {campaign!r}: the approvers are "
                f"{settings.approvers(campaign, list(prepared['approvers']))} and "
                f"{triggering_user!r} triggered this run (nobody may approve their own run); "
                f"name another approver in the campaign spec or the Airflow Variable "
                f"mailroom_approvers__{campaign}. Nothing was sent."
            )
        self.assigned_users = [{"id": user, "name": user} for user in eligible]
        self.response_timeout = timedelta(hours=float(prepared["response_timeout_hours"]))
        resend = prepared.get("resend") or {}
        if resend.get("resend_to_earlier_recipients"):
            self.subject = f"{self.subject} (RESEND to earlier recipients)"
            self.body = (
                "**This run was triggered to send again to everyone an earlier run of this "
                f"campaign sent to.** Reason: {_one_line(str(resend.get('resend_reason')))}\n\n"
                + (self.body or "")
            )
        deadline = datetime.now(UTC) + self.response_timeout
        self.body = (self.body or "") + (
            "\n\n### Who may answer\n"
            f"{', '.join(f'**{u}**' for u in eligible)}"
            + (
                f" ({triggering_user} triggered this run and may not approve it)"
                if triggering_user
                else ""
            )
            + f". No answer by {deadline:%Y-%m-%d %H:%M} UTC counts as Reject."
        )
        self.log.info(
            "approval: waiting for one of %s (triggered by %s) until %s UTC",
            ", ".join(eligible),
            triggering_user or "unknown",
            f"{deadline:%Y-%m-%d %H:%M:%S}",
        )
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        # The answer goes into the run's folder first, so the report states who decided what and
        # when, whatever the operator does next (skip, fail, or carry on).
        from mailroom.approval.summary import decision_line

        prepared = context["ti"].xcom_pull(task_ids=self.prepare_task_id)
        tasks.record_approval(prepared, event)
        self.log.info("approval: %s", decision_line(tasks.approval_record(event)))
        return super().execute_complete(context, event)


def _one_line(text: str) -> str:
    """The trigger's reason as plain text on one line (no Markdown it could inject)."""
    from mailroom.approval.summary import inline_text

    return inline_text(text)
