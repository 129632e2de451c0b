"""Today's send path before the window, kept as a benchmark baseline (not used by Mailroom).

A copy of the SendGrid send as it was: ``pipeline.send_shard`` → ``shards.send_shard`` with one
request in flight, the envelope guard parsing every body again inside ``Transport.send`` (no
clearance is passed), and the request through the SDK's own HTTP client
(``python_http_client``: a new ``urllib`` opener per request, ``Connection: close``, so a new TCP
connection and, over HTTPS, a new TLS context and handshake per request). The outbox, the rate
limiter, the retries and the logging are the same calls as in ``src``. Only what a whole-request
transport runs is copied (no per-recipient ledger, no preflight).
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.error
from pathlib import Path
from typing import Any

from mailroom.addresses import mask_addresses
from mailroom.batches import BatchEntry
from mailroom.checks.envelope_guard import ApprovedManifest, GuardedBody
from mailroom.delivery.outbox import BatchState, Outbox
from mailroom.delivery.rate import RetryPolicy, SharedRateLimiter
from mailroom.delivery.shards import ShardProgress
from mailroom.delivery.transports.base import Delivery, Transport
from mailroom.delivery.transports.sendgrid import SendGridSettings, _http_failure
from mailroom.errors import EnvelopeViolation, TransportError
from mailroom.pipeline import Run, _approved

log = logging.getLogger("mailroom.delivery.shards")
_CONTENT_TYPE = "application/json; charset=utf-8"


class LegacySendGridTransport(Transport):
    """The SendGrid transport as it was: every request through the SDK's HTTP client."""

    name = "sendgrid-legacy"

    def __init__(self, settings: SendGridSettings) -> None:
        from sendgrid import SendGridAPIClient

        self.settings = settings
        self._client = SendGridAPIClient(settings.api_key, host=settings.host.rstrip("/"))
        self._client.client.timeout = settings.timeout_seconds

    def _deliver(self, guarded: GuardedBody) -> Delivery:
        from python_http_client.exceptions import HTTPError

        try:
            response = self._client.client.mail.send.post(
                request_body=guarded.body.decode("utf-8"),
                request_headers={"Content-Type": _CONTENT_TYPE},
                timeout=self.settings.timeout_seconds,
            )
        except HTTPError as exc:
            raise _http_failure(exc.status_code, exc.headers, exc.body) from None
        except urllib.error.URLError as exc:
            raise TransportError(
                f"SendGrid unreachable at {self.settings.host}: {exc.reason}", retryable=True
            ) from None
        except (TimeoutError, http.client.HTTPException, ConnectionError) as exc:
            raise TransportError(
                f"SendGrid answer lost after the request was sent: {type(exc).__name__}",
                outcome_unknown=True,
            ) from None
        status = response.status_code
        if status not in (200, 202):
            raise TransportError(f"SendGrid answered {status}", status=status)
        message_id = response.headers.get("X-Message-Id") or ""
        if not message_id:
            raise TransportError(f"SendGrid answered {status} without an X-Message-Id")
        return Delivery(message_id=message_id, status=status)


def pipeline_send_shard(
    run: Run, *, shard: int, manifest_sha256: str, transport: Transport, outbox: Outbox
) -> dict[str, Any]:
    """``pipeline.send_shard`` as it was (one shard of one)."""
    spec = run.spec()
    manifest, shared = _approved(run, manifest_sha256, outbox)
    limiter = SharedRateLimiter(
        outbox, run.run_key, spec.rate.requests_per_second, spec.rate.recipients_per_second
    )
    with transport:
        if outbox.unguarded(run.run_key):
            raise EnvelopeViolation("not every request was cleared by the guard's pass")
        mine = manifest.shard(shard, 1)
        approved = ApprovedManifest(
            manifest.sha256, manifest.digests, shared, spec.public_addresses
        )
        outbox.mark_interrupted(run.run_key, [b.batch_id for b in mine])
        progress = ShardProgress(total=len(mine))
        settled = {
            batch_id
            for batch_id, st in outbox.states(run.run_key, [b.batch_id for b in mine]).items()
            if st.state not in (BatchState.STAGED, BatchState.HALTED)
        }
        for position, entry in enumerate(mine):
            if outbox.halt_requested(run.run_key):
                outbox.halt_remaining(run.run_key, [b.batch_id for b in mine[position:]])
                break
            if entry.batch_id in settled:
                progress.skipped += 1
                continue
            limiter.acquire(entry.recipients)
            if not outbox.claim(run.run_key, entry.batch_id):
                progress.skipped += 1
                continue
            state = _send_batch(
                run.run_key,
                entry,
                run.staging.batches_dir,
                approved,
                transport,
                outbox,
                limiter,
                RetryPolicy(),
            )
            progress.record(state, entry.recipients)
            if progress.done % 10 == 0 or position == len(mine) - 1:
                log.info("shard %d: %s", shard, progress.line())
    return {"batches": len(mine), "recipients_sent": progress.recipients_sent}


def _send_batch(
    run_key: str,
    entry: BatchEntry,
    batches_dir: Path,
    approved: ApprovedManifest,
    transport: Transport,
    outbox: Outbox,
    limiter: SharedRateLimiter,
    retry: RetryPolicy,
) -> BatchState:
    body = (batches_dir / entry.file).read_bytes()
    members = outbox.batch_members(run_key, entry.batch_id)
    attempt = 0
    while True:
        attempt += 1
        if attempt > 1:
            limiter.acquire(entry.recipients)
        try:
            # No clearance: the full guard runs on the body again, as it did.
            delivery = transport.send(body, approved, expected_recipients=members)
        except TransportError as exc:
            message = mask_addresses(str(exc))
            if exc.outcome_unknown:
                outbox.finish(run_key, entry.batch_id, BatchState.UNKNOWN, error=message)
                return BatchState.UNKNOWN
            if exc.retryable and attempt < retry.max_attempts:
                time.sleep(retry.delay(attempt, exc.retry_after))
                continue
            outbox.finish(run_key, entry.batch_id, BatchState.FAILED, error=message)
            return BatchState.FAILED
        outbox.finish(run_key, entry.batch_id, BatchState.SENT, message_id=delivery.message_id)
        return BatchState.SENT
