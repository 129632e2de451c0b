"""What the approver reads before answering: the numbers, the checks, a preview, the digest.

``approval_summary`` gathers everything from the run's folder once (and writes a full preview of
one real recipient's message per locale next to it); ``approval_markdown`` turns that into the
Markdown body Airflow shows on the run's *Required Actions* page, which ``mailroom approvals
show`` prints too. Nothing here knows about Airflow.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from mailroom import earlier_runs
from mailroom.addresses import addresses_shown, is_valid_single_address, mask, readable
from mailroom.batches import load_manifest
from mailroom.run import Run
from mailroom.staging import read_json, write_json
from mailroom.substitutions import UNSUBSCRIBE_FIELD, apply_substitutions, substitution_tag

PREVIEW_LINES = 6
PREVIEW_LINE_CHARS = 160
MASKED_TOKEN = "MASKED-TOKEN"
MASKED_VALUE = "[masked: shows an address]"
SUMMARY_FILE = "summary.json"  # in the run's preview folder
_MARKDOWN_SPECIAL = re.compile(r"[\\`*_\[\]#~]")


def preview_dir(run: Run) -> Path:
    return run.staging.preview_dir


def data_docs_index(run: Run) -> Path:
    """Where the gate's Great Expectations Data Docs are written, when they are."""
    return run.staging.gate_data_docs / "index.html"


def summarise(run: Run, *, triggered_by: str | None, console_url: str | None = None) -> str:
    """The approval page's Markdown for a run (``approval_summary`` rendered), kept with the
    previews as ``preview/summary.json`` for the campaign console. ``console_url``: the run's
    page in the campaign console, which the body links to instead of naming files on a
    worker."""
    summary = approval_summary(run, triggered_by=triggered_by)
    summary["console_url"] = console_url
    write_json(run.staging.preview_dir / SUMMARY_FILE, summary)
    return approval_markdown(summary)


def approval_summary(run: Run, *, triggered_by: str | None) -> dict[str, Any]:
    """The numbers behind the approval, as one JSON-able dict; writes the previews."""
    st = run.staging
    spec = run.spec()
    manifest = load_manifest(st.manifest)
    extract = read_json(st.extract_counts)
    validation = read_json(st.audience_validation)
    gate = read_json(st.gate_result)
    left_out = earlier_runs.read_record(st) or {}

    kept = _locale_counts(st.snapshot)
    quarantined = _locale_counts(st.quarantine) if st.quarantine.exists() else Counter()
    per_locale: dict[str, dict[str, Any]] = {}
    for loc in spec.locales:
        content = read_json(st.content_file(loc))
        per_locale[loc] = {
            "kept": kept.get(loc, 0),
            "quarantined": quarantined.get(loc, 0),
            "recipients": 0,
            "batches": 0,
            "subject": content["subject"],
            "untranslated": len(content.get("untranslated") or []),
        }
    for b in manifest.batches:
        entry = per_locale.setdefault(
            b.locale,
            {"kept": 0, "quarantined": 0, "recipients": 0, "batches": 0, "subject": ""},
        )
        entry["batches"] += 1
        entry["recipients"] += b.recipients

    batch_count = len(manifest.batches)
    recipients = manifest.recipients
    rps, rcps = spec.rate.requests_per_second, spec.rate.recipients_per_second
    estimates = [n / rate for n, rate in ((batch_count, rps), (recipients, rcps)) if rate]
    checks = [
        c
        for part in ("personalization_checks", "request_checks")
        for c in (gate.get(part) or {}).get("checks", [])
    ]
    docs = data_docs_index(run)
    return {
        "campaign": spec.name,
        "description": spec.description,
        "run_id": run.run_id,
        "triggered_by": triggered_by,
        "dry_run": run.dry_run,
        "transport": "file (dry run)"
        if run.dry_run
        else f"{spec.transport} ({spec.connection_id})",
        "sender": f"{spec.sender.name} <{spec.sender.email}>"
        if spec.sender.name
        else spec.sender.email,
        "audience": {
            "extracted": extract["extracted"],
            "suppressed": extract["suppressed"],
            "suppressed_by_reason": extract.get("suppressed_by_reason") or {},
            "duplicates": extract["duplicates"],
            "locale_defaulted": extract.get("locale_defaulted", 0),
            "kept": extract.get("kept", sum(kept.values())),
            "quarantined": validation["quarantined"],
            "quarantined_by_reason": validation.get("quarantined_by_reason") or {},
            "valid": validation["valid"],
            "left_out": {
                reason: int((left_out.get("left_out") or {}).get(reason, 0))
                for reason in earlier_runs.REASONS
            },
            "to_send": recipients,
        },
        "earlier_runs": {
            "left_out_by_earlier_run": left_out.get("left_out_by_earlier_run") or {},
            "resend_to_earlier_recipients": bool(left_out.get("resend_to_earlier_recipients")),
            "resend_reason": left_out.get("resend_reason"),
            "earlier_recipients_included": left_out.get("earlier_recipients_included") or {},
            "sending_run_when_built": left_out.get("sending_run_when_built"),
            "file": run.where(earlier_runs.left_out_json(st)) if left_out else None,
        },
        "per_locale": dict(sorted(per_locale.items())),
        "quality": {
            "success": bool(gate["success"]),
            "personalizations": gate["personalizations"],
            "batches": gate["batches"],
            "checks": len(checks),
            "checks_failed": [_check_name(c) for c in checks if not c.get("success")],
            "result_file": run.where(st.gate_result),
            "data_docs": run.where(docs) if docs.exists() else None,
            "audience_file": run.where(st.audience_validation),
            "quarantine_file": run.where(st.quarantine) if st.quarantine.exists() else None,
        },
        "previews": write_previews(run),
        "canary": read_json(st.canary_dir / "result.json")
        if (st.canary_dir / "result.json").exists()
        else None,
        "batches": batch_count,
        "recipients": recipients,
        "shards": min(run.shard_count, max(batch_count, 1)),
        "rate_requests_per_second": rps,
        "rate_recipients_per_second": rcps,
        "estimated_seconds": round(max(estimates), 1) if estimates else None,
        "response_timeout_hours": spec.response_timeout_hours,
        "manifest_sha256": manifest.sha256,
        "staging": run.where(st.root),
    }


def write_previews(run: Run) -> dict[str, dict[str, Any]]:
    """Per locale, the first recipient of its first frozen request, as they will see it.

    The personalization's own substitutions are applied to the frozen request's subject, text and
    HTML (the same one-pass replacement SendGrid and the dev server do); the address is masked
    and the unsubscribe token replaced, so a click on the preview unsubscribes nobody. The full
    HTML and text go to ``<run>/preview/<locale>.html|.txt``.
    """
    st = run.staging
    spec = run.spec()
    manifest = load_manifest(st.manifest)
    out_dir = preview_dir(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    masked_url = spec.unsubscribe.url_template.replace("{token}", MASKED_TOKEN)
    public = spec.public_addresses
    previews: dict[str, dict[str, Any]] = {}
    for entry in manifest.batches:
        if entry.locale in previews:
            continue
        body = json.loads((st.batches_dir / entry.file).read_bytes())
        first = body["personalizations"][0]
        subs = {
            tag: preview_value(str(value), public)
            for tag, value in (first.get("substitutions") or {}).items()
        }
        subs[substitution_tag(UNSUBSCRIBE_FIELD, html=False)] = masked_url
        subs[substitution_tag(UNSUBSCRIBE_FIELD, html=True)] = html.escape(masked_url, quote=True)
        address = mask(str(first["to"][0]["email"]))
        subject = apply_substitutions(str(body.get("subject", "")), subs)
        text = apply_substitutions(_content(body, "text/plain"), subs)
        page = apply_substitutions(_content(body, "text/html"), subs)
        html_file = out_dir / f"{entry.locale}.html"
        text_file = out_dir / f"{entry.locale}.txt"
        html_file.write_text(
            f"<!-- Mailroom approval preview: {entry.batch_id}, personalization 1, to {address};"
            " unsubscribe token masked -->\n" + page,
            encoding="utf-8",
        )
        text_file.write_text(f"To: {address}\nSubject: {subject}\n\n{text}", encoding="utf-8")
        lines = [line.rstrip() for line in text.splitlines() if line.strip()]
        previews[entry.locale] = {
            "batch": entry.batch_id,
            "to": address,
            "subject": subject,
            "text_lines": [_shorten(line) for line in lines[:PREVIEW_LINES]],
            "more_lines": max(len(lines) - PREVIEW_LINES, 0),
            "html_file": run.where(html_file),
            "text_file": run.where(text_file),
        }
    return dict(sorted(previews.items()))


def preview_value(value: str, public: frozenset[str]) -> str:
    """A recipient's value as the preview shows it: as is, unless it shows an address other than
    the campaign's own (``{{ recipient.email }}``, a name that spells one out, in any spelling
    ``addresses_shown`` reads). Then a value that is one address is masked like the ``to``
    (``j***@example.com``), and any other is replaced whole: a masked part of a name could still
    spell the rest."""
    if not addresses_shown(value) - public:
        return value
    plain = readable(html.unescape(value)).strip()
    return mask(plain) if is_valid_single_address(plain) else MASKED_VALUE


def approval_markdown(summary: dict[str, Any]) -> str:
    a = summary["audience"]
    q = summary["quality"]
    left_out = a.get("left_out") or {}
    lines = [
        f"## {summary['campaign']}: {summary['description']}",
        "",
        f"Run `{summary['run_id']}`, triggered by **{summary['triggered_by'] or 'unknown'}**; "
        f"from {summary['sender']} through {summary['transport']}"
        + (" — **dry run: the file transport, nothing leaves**" if summary["dry_run"] else "")
        + ".",
        "",
        *_resend_banner(summary),
        "### Audience",
        "| extracted | suppressed | duplicates | quarantined (invalid) "
        "| already sent (earlier run) | unknown (earlier run) | to send |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {a['extracted']:,} | {a['suppressed']:,} | {a['duplicates']:,} "
        f"| {a['quarantined']:,} | {left_out.get('already_sent', 0):,} "
        f"| {left_out.get('unknown_earlier', 0):,} | **{a['to_send']:,}** |",
        "",
        *_earlier_runs(summary),
        f"Suppressed: {_by_reason(a['suppressed_by_reason'])}. "
        "Quarantined, by the check that caught them: "
        f"{_by_reason(a['quarantined_by_reason'], code=True)}. "
        "Suppressed and duplicate addresses are dropped from the whole source, before locales are "
        f"assigned ({a['locale_defaulted']:,} recipients got the default locale).",
        "",
        "### Per locale",
        "| locale | kept | quarantined | to send | batches | untranslated | subject |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for loc, e in summary["per_locale"].items():
        lines.append(
            f"| {loc} | {e['kept']:,} | {e['quarantined']:,} | {e['recipients']:,} "
            f"| {e['batches']:,} | {e.get('untranslated', 0)} | {_cell(e['subject'])} |"
        )
    lines += [
        "",
        "### Data quality",
        f"Audience (Great Expectations on the snapshot): {a['valid']:,} valid, "
        f"{a['quarantined']:,} quarantined; result `{q['audience_file']}`"
        + (f", quarantined rows `{q['quarantine_file']}`" if q["quarantine_file"] else "")
        + ".",
        "",
        f"Gate on the frozen batches: **{'PASSED' if q['success'] else 'FAILED'}** — "
        f"{q['checks'] - len(q['checks_failed'])} of {q['checks']} checks passed on "
        f"{q['personalizations']:,} personalizations in {q['batches']:,} batches "
        "(one recipient each, no cc/bcc, no address twice, every value the recipient's own)"
        + (f"; failed: {', '.join(q['checks_failed'])}" if q["checks_failed"] else "")
        + ".",
        "",
        (
            f"The full report, the Data Docs of both checks and each locale's whole message: "
            f"[open this run in the campaign console]({summary['console_url']})."
            if summary.get("console_url")
            else f"Full report: `{q['result_file']}`"
            + (f"; Data Docs: `{q['data_docs']}`" if q["data_docs"] else "")
            + "."
        ),
        "",
        "### Preview: one real recipient per locale (address masked, unsubscribe token masked)",
    ]
    for loc, p in summary["previews"].items():
        shown = [*p["text_lines"], *(["…"] if p["more_lines"] else [])]
        fence = "`" * max(3, _longest_backtick_run("\n".join(shown)) + 1)
        lines += [
            "",
            f"**{loc}** — to `{p['to']}` — subject: **{_inline(p['subject'])}**",
            "",
            f"{fence}text",
            *shown,
            fence,
            "",
            f"Full message: [HTML and text in the campaign console]"
            f"({summary['console_url']}#preview-{loc})."
            if summary.get("console_url")
            else f"Full message: HTML `{p['html_file']}`, text `{p['text_file']}`.",
        ]
    canary = summary.get("canary")
    if canary:
        sent = ", ".join(f"{loc} ({c['message_id']})" for loc, c in canary["locales"].items())
        lines += [
            "",
            "### Canary",
            f"Sent before this approval through the same transport and guard to the seed list "
            f"({', '.join(f'`{s}`' for s in canary['seeds'])}): {sent}. Check those inboxes.",
        ]
    lines += [
        "",
        "### Sending",
        f"{summary['batches']:,} batches (one request each) for {summary['recipients']:,} "
        f"recipients over {summary['shards']} shard(s); {_rate(summary)}.",
        "",
        f"Approve sends exactly the manifest `{summary['manifest_sha256']}`: every request "
        "whose bytes differ from it is refused. Reject, or no answer within "
        f"{_hours(summary['response_timeout_hours'])}, ends the run with nothing sent.",
        "",
        f"Campaign console: [{summary['campaign']} / {summary['run_id']}]({summary['console_url']})"
        if summary.get("console_url")
        else f"Run folder: `{summary['staging']}`",
    ]
    return "\n".join(lines)


def _resend_banner(summary: dict[str, Any]) -> list[str]:
    """The resend choice first, where no approver can miss it."""
    e = summary.get("earlier_runs") or {}
    if not e.get("resend_to_earlier_recipients"):
        return []
    included = sum((e.get("earlier_recipients_included") or {}).values())
    return [
        f"> **RESEND requested**: this run sends again to {included:,} recipient(s) an earlier "
        "run of this campaign already sent to (or may have). Reason given by the trigger: "
        f"**{_inline(str(e.get('resend_reason') or ''))}**",
        "",
    ]


def _earlier_runs(summary: dict[str, Any]) -> list[str]:
    """How many were left out because an earlier run of the campaign sent to them, and why."""
    e = summary.get("earlier_runs") or {}
    left = {reason: 0 for reason in earlier_runs.REASONS}
    left.update(summary["audience"].get("left_out") or {})
    lines = []
    if sum(left.values()):
        runs = ", ".join(
            f"`{run_id}` {n:,}" for run_id, n in (e.get("left_out_by_earlier_run") or {}).items()
        )
        lines.append(
            f"Left out because an earlier run of this campaign sent to them: "
            f"**{left['already_sent']:,} already sent**, **{left['unknown_earlier']:,} unknown** "
            f"(the provider may have their message; not sent twice). By earlier run: {runs}. "
            "Trigger with `resend_to_earlier_recipients` and a `resend_reason` to include them."
        )
    elif e.get("resend_to_earlier_recipients"):
        included = e.get("earlier_recipients_included") or {}
        lines.append(
            "Nobody left out (resend requested): "
            f"{included.get('already_sent', 0):,} already sent and "
            f"{included.get('unknown_earlier', 0):,} unknown by an earlier run are included."
        )
    else:
        lines.append("No earlier run of this campaign sent to anyone in this audience.")
    if e.get("sending_run_when_built"):
        lines.append(
            f"Run `{e['sending_run_when_built']}` of this campaign was sending when this run was "
            "built: anyone it sends to before this run sends is not sent twice (that batch fails "
            "with the reason)."
        )
    return [" ".join(lines), ""]


def decision_line(approval: dict[str, Any], *, recipients: int | None = None) -> str:
    """One line on what the approval gate decided, for task logs and terminals."""
    decision = approval.get("decision")
    at = approval.get("at") or "unknown time"
    nothing = " nothing was sent" + (f" (0 of {recipients:,} recipients)" if recipients else "")
    if decision == "approved":
        return f"APPROVED by {approval.get('by')} at {at}"
    if decision == "rejected":
        return f"REJECTED by {approval.get('by')} at {at}:{nothing}"
    if decision == "timed_out":
        return f"TIMED OUT without an answer at {at} (counts as Reject):{nothing}"
    return f"NOT APPROVED ({approval.get('detail') or decision}):{nothing}"


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(math.ceil(seconds), 1)} s"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _rate(summary: dict[str, Any]) -> str:
    parts = []
    if summary["rate_requests_per_second"]:
        parts.append(f"{summary['rate_requests_per_second']:g} requests/s")
    if summary["rate_recipients_per_second"]:
        parts.append(f"{summary['rate_recipients_per_second']:g} recipients/s")
    if not parts:
        return "no rate limit (as fast as the provider answers)"
    eta = summary["estimated_seconds"]
    return f"planned rate {' and '.join(parts)} for the whole run: about {format_duration(eta)}"


def _hours(hours: float) -> str:
    if hours >= 1:
        return f"{hours:g} h"
    return f"{hours * 60:.3g} min"


def _locale_counts(path: Path) -> Counter[str]:
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=["locale"]).column("locale").to_pylist()
    return Counter("?" if loc is None else str(loc) for loc in column)


def _content(body: dict[str, Any], kind: str) -> str:
    for block in body.get("content") or []:
        if str(block.get("type", "")).lower() == kind:
            return str(block.get("value") or "")
    return ""


def _check_name(check: dict[str, Any]) -> str:
    return str(check["expectation"]) + (f"({check['column']})" if check.get("column") else "")


def _by_reason(counts: dict[str, int], *, code: bool = False) -> str:
    if not counts:
        return "none"
    return ", ".join(
        (f"`{' '.join(str(k).split())}`" if code else _inline(str(k))) + f" {v:,}"
        for k, v in sorted(counts.items())
    )


def _shorten(line: str) -> str:
    return line if len(line) <= PREVIEW_LINE_CHARS else line[: PREVIEW_LINE_CHARS - 1] + "…"


def _cell(text: str) -> str:
    return _inline(text).replace("|", "\\|")


def inline_text(text: str) -> str:
    """Text from a trigger or the data as Markdown-safe plain text on one line (for the HITL
    page, which shows more than this summary)."""
    return _inline(text)


def _inline(text: str) -> str:
    """Recipient data shown as text on one line: no Markdown emphasis, links or raw HTML."""
    text = " ".join(text.split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIAL.sub(lambda m: "\\" + m.group(0), text)


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return longest
