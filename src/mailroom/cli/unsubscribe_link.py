"""``mailroom unsubscribe-link CAMPAIGN USER_ID``: one user's unsubscribe link, for support staff.

The link is the campaign spec's ``unsubscribe.url`` with the user's token in place of
``{token}``, exactly as the campaign's messages carry it: the token signed with the newest of
the secrets in ``MAILROOM_UNSUBSCRIBE_SECRETS`` (newest first, separated by commas; the list
the Airflow Variable ``mailroom_unsubscribe_secret`` holds too). The spec is read from the
project's campaigns folder (``<include>/campaigns/<campaign>.yaml``; ``--include-dir``, else env
``MAILROOM_INCLUDE_DIR``, else ``include/`` in the project). Only the link is printed on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mailroom.campaign_spec import load_campaign
from mailroom.errors import MailroomError
from mailroom.run import ProjectPaths
from mailroom.unsubscribe import SECRETS_ENV, UnsubscribeKeys

NAME = "mailroom unsubscribe-link"


def add_parser(sub: Any) -> None:
    cmd = sub.add_parser(
        "unsubscribe-link",
        help="print one user's unsubscribe link for a campaign (signed with the newest secret "
        f"of {SECRETS_ENV})",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("campaign", metavar="CAMPAIGN", help="the campaign's name, as in its spec")
    cmd.add_argument("user_id", metavar="USER_ID", help="the user's id, as the audience has it")
    cmd.add_argument(
        "--include-dir",
        type=Path,
        help="the project folder holding campaigns/ (env MAILROOM_INCLUDE_DIR; default the "
        "project's include/)",
    )


def run_command(args: argparse.Namespace, repo: Path) -> int:
    include = args.include_dir or Path(os.environ.get("MAILROOM_INCLUDE_DIR") or repo / "include")
    if not args.user_id.strip():
        print(f"{NAME}: the user id is empty", file=sys.stderr)
        return 2
    try:
        spec = load_campaign(ProjectPaths.under(include).campaigns, args.campaign)
        keys = UnsubscribeKeys.from_env()
    except (MailroomError, OSError) as exc:
        print(f"{NAME}: {exc}", file=sys.stderr)
        return 2
    print(unsubscribe_link(spec.unsubscribe.url_template, keys.sign(spec.name, args.user_id)))
    return 0


def unsubscribe_link(url_template: str, token: str) -> str:
    """The campaign's unsubscribe URL with ``token`` in it, as ``envelopes`` writes it."""
    return url_template.replace("{token}", quote(token, safe=""))
