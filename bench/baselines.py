"""The baselines the stages are read against, each measured in the same run as the stage.

- ``bare_encode``: the serialization limit. The request bodies freeze wrote, already in memory as
  Python objects, encoded with the standard library's JSON encoder and written to files; only
  the encoding and the writing are timed. ``build + freeze`` is read against it.
- ``bare_post``: the transport limit. The frozen bodies POSTed by a bare kept-alive client with
  the send's window: as many threads as requests in flight, each with one kept-open
  ``http.client`` connection (over HTTPS, every one from one TLS context built once), taking
  the bodies in order: no guard, no outbox, no rate limiter, no SDK, no logging. The send
  stage is read against it, over the same network.
- ``naive``: what most tutorials would write. Per recipient, the whole template rendered with
  Jinja2 (gettext catalogs compiled once per locale), its CSS inlined, and one request through
  the SendGrid SDK's ``Mail`` helper, on a sample of recipients; reported per recipient.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from services import API_KEY


@dataclass(frozen=True)
class FrozenBatch:
    file: Path
    recipients: int
    sha256: str


def frozen_batches(manifest_path: Path) -> list[FrozenBatch]:
    """The batches a manifest lists, in its order (read as plain JSON)."""
    manifest = json.loads(manifest_path.read_bytes())
    return [
        FrozenBatch(manifest_path.parent / b["file"], int(b["recipients"]), b["sha256"])
        for b in manifest["batches"]
    ]


# --- serialization limit -------------------------------------------------------------------------
def bare_encode(manifest_path: Path, out_dir: Path) -> dict[str, Any]:
    """Encode every frozen body again with ``json.dumps`` and write it; time only that."""
    out_dir.mkdir(parents=True, exist_ok=True)
    timed = cpu = 0.0
    identical = recipients = written = 0
    batches = frozen_batches(manifest_path)
    for batch in batches:
        body = json.loads(batch.file.read_bytes())  # the input, not timed
        t0, c0 = time.perf_counter(), time.process_time()
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        (out_dir / batch.file.name).write_bytes(data)
        timed += time.perf_counter() - t0
        cpu += time.process_time() - c0
        identical += hashlib.sha256(data).hexdigest() == batch.sha256
        recipients += batch.recipients
        written += len(data)
    return {
        "seconds": timed,
        "cpu_seconds": cpu,
        "requests": len(batches),
        "recipients": recipients,
        "bytes": written,
        "identical_bodies": identical,
    }


# --- transport limit ------------------------------------------------------------------------------
def bare_post(
    manifest_path: Path, server_url: str, *, window: int = 1, ca_file: str | None = None
) -> dict[str, Any]:
    """POST every frozen body over ``window`` kept-open connections at once, in order; every
    answer must be 202."""
    parts = urlsplit(server_url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    statuses: dict[int, int] = {}
    recipients = 0
    batches = iter(frozen_batches(manifest_path))
    lock = threading.Lock()
    t0 = time.perf_counter()
    context = ssl.create_default_context(cafile=ca_file) if parts.scheme == "https" else None

    def connection() -> http.client.HTTPConnection:
        if context is None:
            return http.client.HTTPConnection(host, port, timeout=60)
        return http.client.HTTPSConnection(host, port, timeout=60, context=context)

    def worker() -> None:
        nonlocal recipients
        conn = connection()
        try:
            while True:
                with lock:
                    batch = next(batches, None)
                if batch is None:
                    return
                conn.request("POST", "/v3/mail/send", body=batch.file.read_bytes(), headers=headers)
                response = conn.getresponse()
                response.read()
                with lock:
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    if response.status == 202:
                        recipients += batch.recipients
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(window)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "seconds": time.perf_counter() - t0,
        "requests": sum(statuses.values()),
        "recipients": recipients,
        "window": window,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


# --- the tutorial pipeline ------------------------------------------------------------------------
def naive_pipeline(
    *,
    spec: Any,
    templates_dir: Path,
    translations_dir: Path,
    valid_audience: Path,
    secret: bytes,
    server_url: str,
    sample: int,
) -> dict[str, Any]:
    """Render and send ``sample`` recipients one by one; seconds per part, summed."""
    import pyarrow.parquet as pq
    from sendgrid import SendGridAPIClient
    from sendgrid.helpers.mail import Mail

    from mailroom.unsubscribe import unsubscribe_token

    first = next(pq.ParquetFile(valid_audience).iter_batches(batch_size=sample), None)
    rows = first.to_pylist() if first is not None else []
    field = spec.fields[0] if spec.fields else None
    campaign = {
        "name": spec.name,
        "sender_name": spec.sender.name,
        "company_address": spec.company_address,
    }
    renderers = {
        locale: _TutorialRenderer(templates_dir, translations_dir, spec.template, locale)
        for locale in spec.locales
    }
    client = SendGridAPIClient(API_KEY, host=server_url)
    parts = {"render": 0.0, "inline_css": 0.0, "request": 0.0}
    cpu = [0.0]
    statuses: dict[int, int] = {}

    def timed(part: str, call: Callable[[], Any]) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        value = call()
        parts[part] += time.perf_counter() - t0
        cpu[0] += time.process_time() - c0
        return value

    for row in rows:
        token = unsubscribe_token(secret, spec.name, str(row["user_id"]))
        context = {
            "recipient": {f: row.get(f) or "" for f in spec.fields},
            "unsubscribe_url": spec.unsubscribe.url_template.replace("{token}", token),
            "campaign": campaign,
        }
        renderer = renderers[row["locale"]]
        subject, html, text = timed("render", lambda r=renderer, c=context: r.render(c))
        html = timed("inline_css", lambda h=html: _inline(h))
        message = timed(
            "request",
            lambda r=row, s=subject, h=html, t=text: Mail(
                from_email=(spec.sender.email, spec.sender.name),
                to_emails=r["email"],
                subject=s,
                plain_text_content=t,
                html_content=h,
            ),
        )
        response = timed("request", lambda m=message: client.send(m))
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    seconds = sum(parts.values())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu[0],
        "recipients": len(rows),
        "field": field,
        "parts": parts,
        "per_recipient_ms": {k: 1000 * v / max(len(rows), 1) for k, v in parts.items()},
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def _inline(html: str) -> str:
    import css_inline

    return str(css_inline.inline(html))


class _TutorialRenderer:
    """One Jinja2 environment per locale with its gettext catalog, the way a tutorial sets up
    i18n; templates compiled once, rendered with the recipient's own values each time."""

    def __init__(self, templates_dir: Path, translations_dir: Path, template: str, locale: str):
        from io import BytesIO

        from babel import Locale
        from babel.messages.mofile import write_mo
        from babel.messages.pofile import read_po
        from babel.support import Translations
        from jinja2 import Environment, FileSystemLoader, select_autoescape

        with (translations_dir / locale / "LC_MESSAGES" / "messages.po").open("rb") as fp:
            catalog = read_po(fp)
        buffer = BytesIO()
        write_mo(buffer, catalog)
        buffer.seek(0)
        env = Environment(
            loader=FileSystemLoader(templates_dir),
            autoescape=select_autoescape(enabled_extensions=("html",), default=False),
            extensions=["jinja2.ext.i18n"],
        )
        env.policies["ext.i18n.trimmed"] = True
        env.install_gettext_translations(  # type: ignore[attr-defined]
            Translations(fp=buffer, domain="messages"), newstyle=True
        )
        self.locale = locale
        self.direction = Locale.parse(locale).text_direction
        self.templates = [
            env.get_template(f"{template}/{name}")
            for name in ("subject.txt", "body.html", "body.txt")
        ]

    def render(self, context: dict[str, Any]) -> tuple[str, str, str]:
        full = {**context, "locale": self.locale, "text_direction": self.direction}
        subject, html, text = (t.render(full) for t in self.templates)
        return subject.strip(), html, text
