"""``mailroom feedback serve``: the feedback service (``mailroom.feedback.service``) on a port.

It faces the internet, so it runs on its own (its own process, its own compose service), never
inside Airflow's API server. It reads its keys from the environment, never from its command line:

- ``MAILROOM_UNSUBSCRIBE_SECRETS``: the unsubscribe links' signing keys, newest first (the one
  Airflow signs with first; older ones keep verifying the links already sent);
- ``MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY``: SendGrid's signed Event Webhook's verification key,
  as SendGrid shows it. Without it the service does not start, unless given
  ``--accept-unsigned-webhooks`` (local development only: anyone could post events).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from mailroom.errors import ValidationFailed


def add_parser(sub: Any) -> None:
    cmd = sub.add_parser(
        "feedback",
        help="the feedback service: one-click unsubscribes and SendGrid's delivery events",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = cmd.add_subparsers(dest="feedback_command", required=True)
    serve = actions.add_parser("serve", help="serve /u/{token}, /webhooks/sendgrid and /healthz")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8025)
    serve.add_argument(
        "--outbox-url",
        default=os.environ.get("MAILROOM_OUTBOX_URL"),
        help="the outbox database (env MAILROOM_OUTBOX_URL)",
    )
    serve.add_argument(
        "--soft-bounce-limit",
        type=int,
        default=None,
        help="soft bounces (deferred, blocked) in a row that suppress an address (env "
        "MAILROOM_SOFT_BOUNCE_LIMIT, default 3)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="the largest webhook body taken (default 8 MiB)",
    )
    serve.add_argument(
        "--accept-unsigned-webhooks",
        action="store_true",
        help="local development only: take SendGrid events without a signature",
    )
    serve.add_argument("--log-level", default="info")


def run_command(args: argparse.Namespace) -> int:
    from mailroom.feedback.service import DEFAULT_MAX_BODY_BYTES, FeedbackSettings, create_app
    from mailroom.feedback.webhook_signature import PUBLIC_KEY_ENV, WebhookSignature
    from mailroom.unsubscribe import UnsubscribeKeys

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("mailroom.feedback")
    if not args.outbox_url:
        print(
            "mailroom feedback serve: give --outbox-url or set MAILROOM_OUTBOX_URL", file=sys.stderr
        )
        return 2
    try:
        limit = args.soft_bounce_limit
        if limit is None:
            text = os.environ.get("MAILROOM_SOFT_BOUNCE_LIMIT", "3").strip()
            if not text.isdigit():
                raise ValidationFailed("MAILROOM_SOFT_BOUNCE_LIMIT is not a whole number")
            limit = int(text)
        keys = UnsubscribeKeys.from_env()
        public_key = os.environ.get(PUBLIC_KEY_ENV, "")
        if public_key.strip():
            signature: WebhookSignature | None = WebhookSignature(public_key)
        elif args.accept_unsigned_webhooks:
            signature = None
        else:
            raise ValidationFailed(
                f"{PUBLIC_KEY_ENV} is not set: it verifies that events come from SendGrid "
                "(--accept-unsigned-webhooks takes unsigned events, for local development only)"
            )
        settings = FeedbackSettings(
            outbox_url=args.outbox_url,
            unsubscribe_keys=keys,
            webhook_signature=signature,
            unsigned_webhooks=signature is None,
            soft_bounce_limit=limit,
            max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
        )
        app = create_app(settings)
    except (ValidationFailed, ValueError) as exc:
        print(f"mailroom feedback serve: {exc}", file=sys.stderr)
        return 2
    if signature is None:
        log.warning(
            "ACCEPTING UNSIGNED WEBHOOKS: anyone who can reach this port can post events and "
            "suppress addresses. For local development only."
        )
    log.info(
        "feedback service on http://%s:%d: %d unsubscribe key(s), soft bounce limit %d",
        args.host,
        args.port,
        len(keys.kids),
        settings.soft_bounce_limit,
    )
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
