"""build_envelopes: one envelope per recipient, carrying only that recipient's values.

An envelope is one row: exactly one address, its locale, and its own substitution values
(HTML-escaped for the HTML tag, CR/LF stripped everywhere), its own unsubscribe link and the
RFC 8058 one-click unsubscribe headers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mailroom.campaign_spec import CampaignSpec
from mailroom.substitutions import UNSUBSCRIBE_FIELD, substitution_tag

log = logging.getLogger(__name__)

CHUNK_ROWS = 100_000
ENVELOPE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("email", pa.string()),
        ("locale", pa.string()),
        ("substitutions", pa.string()),
        ("headers", pa.string()),
    ]
)
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x85\x0b\x0c]+")


def clean_value(value: object) -> str:
    """A substitution value as text on one line: CR/LF would let a value forge headers."""
    text = "" if value is None else str(value)
    return _LINE_BREAKS.sub(" ", text).strip()


def unsubscribe_token(secret: bytes, campaign: str, user_id: str) -> str:
    """``<user id>.<signature>``: the unsubscribe endpoint can tell who, and that we issued it."""
    uid = base64.urlsafe_b64encode(user_id.encode("utf-8")).decode("ascii").rstrip("=")
    mac = hmac.new(secret, f"{campaign}\x00{user_id}".encode(), hashlib.sha256).digest()
    return f"{uid}.{base64.urlsafe_b64encode(mac[:16]).decode('ascii').rstrip('=')}"


def verify_unsubscribe_token(secret: bytes, campaign: str, token: str) -> str | None:
    """The user id a token was issued for, or ``None`` when it is not one of ours."""
    uid_part, _, _ = token.partition(".")
    try:
        user_id = base64.urlsafe_b64decode(uid_part + "=" * (-len(uid_part) % 4)).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    expected = unsubscribe_token(secret, campaign, user_id)
    # Bytes, not str: compare_digest raises TypeError on a str with non-ASCII characters.
    return user_id if hmac.compare_digest(expected.encode(), token.encode()) else None


def envelope_values(
    spec: CampaignSpec, secret: bytes, row: dict[str, Any]
) -> tuple[dict[str, str], dict[str, str]]:
    """The substitutions and headers of one recipient's envelope."""
    subs: dict[str, str] = {}
    for field in spec.fields:
        value = clean_value(row.get(field))
        subs[substitution_tag(field, html=False)] = value
        subs[substitution_tag(field, html=True)] = html.escape(value, quote=True)
    token = unsubscribe_token(secret, spec.name, str(row["user_id"]))
    url = clean_value(spec.unsubscribe.url_template.replace("{token}", quote(token, safe="")))
    subs[substitution_tag(UNSUBSCRIBE_FIELD, html=False)] = url
    subs[substitution_tag(UNSUBSCRIBE_FIELD, html=True)] = html.escape(url, quote=True)
    targets = [f"<{url}>"]
    if spec.unsubscribe.mailto:
        targets.append(f"<mailto:{spec.unsubscribe.mailto}?subject=unsubscribe%20{quote(token)}>")
    headers = {
        "List-Unsubscribe": ", ".join(targets),
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    return subs, headers


def build_envelopes(spec: CampaignSpec, *, valid_audience: Path, out: Path, secret: bytes) -> int:
    """Write one envelope row per valid recipient to ``out``; returns how many."""
    if not secret:
        raise ValueError("an unsubscribe secret is required to sign unsubscribe links")
    parquet = pq.ParquetFile(valid_audience)
    written = 0
    tmp = out.with_suffix(".parquet.tmp")
    with pq.ParquetWriter(tmp, ENVELOPE_SCHEMA) as writer:
        for batch in parquet.iter_batches(batch_size=CHUNK_ROWS):
            rows = batch.to_pylist()
            subs_col, headers_col = [], []
            for row in rows:
                subs, headers = envelope_values(spec, secret, row)
                subs_col.append(json.dumps(subs, ensure_ascii=False))
                headers_col.append(json.dumps(headers, ensure_ascii=False))
            frame = pd.DataFrame(
                {
                    "user_id": [r["user_id"] for r in rows],
                    "email": [r["email"] for r in rows],
                    "locale": [r["locale"] for r in rows],
                    "substitutions": subs_col,
                    "headers": headers_col,
                }
            )
            writer.write_table(
                pa.Table.from_pandas(frame, schema=ENVELOPE_SCHEMA, preserve_index=False)
            )
            written += len(rows)
            log.info("build_envelopes: %d envelopes", written)
    tmp.replace(out)
    return written
