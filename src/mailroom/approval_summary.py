"""What the approver reads before answering: counts, the gate's verdict, subjects, the digest."""

from __future__ import annotations

from typing import Any

from mailroom.payloads import load_manifest
from mailroom.pipeline import Run
from mailroom.staging import read_json


def approval_summary(run: Run, *, triggered_by: str | None) -> dict[str, Any]:
    """The numbers behind the approval, as one JSON-able dict (also used by the CLI)."""
    st = run.staging
    spec = run.spec()
    manifest = read_json(st.manifest)
    per_locale: dict[str, dict[str, int]] = {}
    for b in manifest["batches"]:
        entry = per_locale.setdefault(b["locale"], {"requests": 0, "recipients": 0})
        entry["requests"] += 1
        entry["recipients"] += b["recipients"]
    rate = spec.rate.requests_per_second
    requests = manifest["batch_count"]
    return {
        "campaign": spec.name,
        "description": spec.description,
        "run_id": run.run_id,
        "triggered_by": triggered_by,
        "dry_run": run.dry_run,
        "audience": read_json(st.extract_counts),
        "validation": {k: v for k, v in read_json(st.audience_validation).items() if k != "gx"},
        "gate": {
            k: read_json(st.gate_result)[k] for k in ("success", "personalizations", "requests")
        },
        "subjects": {loc: read_json(st.content_file(loc))["subject"] for loc in spec.locales},
        "per_locale": dict(sorted(per_locale.items())),
        "requests": requests,
        "recipients": manifest["recipient_count"],
        "shards": min(run.shard_count, max(requests, 1)),
        "rate_requests_per_second": rate,
        "estimated_seconds": round(requests / rate, 1) if rate else None,
        "manifest_sha256": load_manifest(st.manifest).sha256,
        "staging": str(st.root),
    }


def approval_markdown(summary: dict[str, Any]) -> str:
    a, v = summary["audience"], summary["validation"]
    lines = [
        f"## {summary['campaign']}: {summary['description']}",
        "",
        f"Run `{summary['run_id']}`, triggered by **{summary['triggered_by'] or 'unknown'}**"
        + (" (dry run: the file transport, nothing leaves)" if summary["dry_run"] else ""),
        "",
        "### Audience",
        "| extracted | suppressed | duplicates | quarantined (invalid) | to send |",
        "|---:|---:|---:|---:|---:|",
        f"| {a['extracted']} | {a['suppressed']} | {a['duplicates']} | {v['quarantined']} "
        f"| {summary['recipients']} |",
        "",
        "### Per locale",
        "| locale | recipients | requests | subject |",
        "|---|---:|---:|---|",
    ]
    for loc, entry in summary["per_locale"].items():
        subject = summary["subjects"].get(loc, "").replace("|", "\\|")
        lines.append(f"| {loc} | {entry['recipients']} | {entry['requests']} | {subject} |")
    gate = summary["gate"]
    eta = summary["estimated_seconds"]
    lines += [
        "",
        "### Data-quality gate on the frozen payloads",
        f"**{'PASSED' if gate['success'] else 'FAILED'}**: "
        f"{gate['personalizations']} personalizations "
        f"in {gate['requests']} requests, one recipient each.",
        "",
        "### Sending",
        f"{summary['requests']} requests over {summary['shards']} shard(s)"
        + (
            f", {summary['rate_requests_per_second']} requests/s, about {eta} s."
            if eta
            else ", no rate limit."
        ),
        "",
        f"Approving approves exactly the payload manifest `{summary['manifest_sha256']}`.",
    ]
    return "\n".join(lines)
