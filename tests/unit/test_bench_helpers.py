"""The benchmark machinery's own logic: the baselines do what they claim, the breakdown adds up,
the report states each target. No timing is asserted here, only structure and arithmetic."""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailroom.campaign_spec import parse_campaign
from sendgrid_dev import SendGridDevServer, read_accepted

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import baselines  # noqa: E402
import e2e_airflow  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import services  # noqa: E402

pytestmark = pytest.mark.unit
REPO = BENCH.parent


def _frozen(tmp_path: Path, bodies: list[dict[str, Any]]) -> Path:
    """A manifest and its bodies in the layout freeze writes (plain JSON, compact)."""
    batches_dir = tmp_path / "batches"
    batches_dir.mkdir()
    batches = []
    for i, body in enumerate(bodies):
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        (batches_dir / f"b{i}.json").write_bytes(data)
        batches.append(
            {
                "file": f"b{i}.json",
                "sha256": hashlib.sha256(data).hexdigest(),
                "recipients": len(body["personalizations"]),
            }
        )
    manifest = batches_dir / "manifest.json"
    manifest.write_text(json.dumps({"batches": batches}))
    return manifest


def _body(*addresses: str) -> dict[str, Any]:
    return {
        "personalizations": [
            {"to": [{"email": a}], "substitutions": {"%%first_name%%": "Zoë"}} for a in addresses
        ],
        "from": {"email": "news@example.test"},
        "subject": "Hello %%first_name%%",
        "content": [{"type": "text/plain", "value": "Hi %%first_name%%"}],
    }


def test_the_campaign_copy_loses_only_its_rate_limit() -> None:
    source = REPO / "include" / "campaigns" / "winter_update.yaml"
    original = yaml.safe_load(source.read_text("utf-8"))
    copy = yaml.safe_load(services.unlimited_spec(source.read_text("utf-8")))

    assert original["rate"]
    assert "rate" not in copy
    assert {k: v for k, v in original.items() if k != "rate"} == copy
    spec = parse_campaign(copy, source="bench copy")
    assert spec.rate.requests_per_second is None
    assert spec.rate.recipients_per_second is None


def test_copy_text_escapes_what_postgres_copy_would_split_on() -> None:
    assert services._copy_text(None) == "\\N"
    assert services._copy_text("Ann\r\nBcc: x\tback\\slash") == "Ann\\r\\nBcc: x\\tback\\\\slash"


def test_bare_encoder_writes_the_frozen_bytes_again(tmp_path: Path) -> None:
    manifest = _frozen(tmp_path, [_body("a@example.test", "b@example.test"), _body("c@例え.jp")])

    done = baselines.bare_encode(manifest, tmp_path / "out")

    assert done["identical_bodies"] == done["requests"] == 2
    assert done["recipients"] == 3
    assert (tmp_path / "out" / "b1.json").read_bytes() == (manifest.parent / "b1.json").read_bytes()


def test_bare_post_sends_every_frozen_body_once(tmp_path: Path) -> None:
    manifest = _frozen(tmp_path, [_body("a@example.test", "b@example.test"), _body("c@x.test")])
    with SendGridDevServer(data_dir=tmp_path / "dev") as server:
        done = baselines.bare_post(manifest, server.url)

    assert done["statuses"] == {"202": 2}
    assert done["recipients"] == 3
    records = read_accepted(tmp_path / "dev")
    assert [len(r["body"]["personalizations"]) for r in records] == [2, 1]


def test_union_counts_overlaps_once_and_clips_to_the_run() -> None:
    assert e2e_airflow.union([(0, 2), (1, 3), (5, 6)], 0, 10) == 4
    assert e2e_airflow.union([(-5, 1), (9, 20)], 0, 10) == 2
    assert e2e_airflow.union([(2, 3), (2.5, 2.7)], 0, 10) == 1
    assert e2e_airflow.union([], 0, 10) == 0


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def test_breakdown_splits_each_task_and_the_run_adds_up() -> None:
    t0 = 1_800_000_000.0
    tis = [
        {"task_id": "extract_audience", "map_index": -1, "queued_when": _iso(t0 + 1),
         "start_date": _iso(t0 + 2), "end_date": _iso(t0 + 10)},
        {"task_id": "approve", "map_index": -1, "queued_when": _iso(t0 + 12),
         "start_date": _iso(t0 + 11), "end_date": _iso(t0 + 15)},
        {"task_id": "send_shard", "map_index": 1, "queued_when": _iso(t0 + 16),
         "start_date": _iso(t0 + 16), "end_date": _iso(t0 + 20)},
        {"task_id": "reconcile", "map_index": -1, "queued_when": _iso(t0 + 20),
         "start_date": _iso(t0 + 21), "end_date": _iso(t0 + 22)},
    ]  # fmt: skip
    records = [
        {
            "stage": "extract_audience",
            "shard": None,
            "start": t0 + 4,
            "end": t0 + 9,
            "peak_rss_mb": 300,
        },
        {"stage": "send_shard", "shard": 1, "start": t0 + 17, "end": t0 + 19, "peak_rss_mb": 200},
    ]

    result = e2e_airflow.breakdown(t0, tis, records)

    tasks = {t["label"]: t for t in result["tasks"]}
    extract = tasks["extract_audience"]
    assert (extract["queue_seconds"], extract["startup_seconds"]) == (1, 2)
    assert (extract["work_seconds"], extract["finish_seconds"]) == (5, 1)
    assert extract["peak_rss_mb"] == 300
    assert tasks["send_shard [1]"]["work_seconds"] == 2
    assert tasks["approve"]["queue_seconds"] is None  # re-queued when it resumed
    assert "work_seconds" not in tasks["reconcile"]
    b = result["breakdown"]
    assert b["wall_seconds"] == 22
    assert (b["work_seconds"], b["approval_seconds"]) == (7, 4)
    assert b["work_seconds"] + b["approval_seconds"] + b["orchestration_seconds"] == 22


def _stage(rows: int, seconds: float, rss: float = 300.0, **extra: Any) -> dict[str, Any]:
    return {
        "rows": rows,
        "unit": "rows",
        "seconds": seconds,
        "cpu_seconds": seconds,
        "rows_per_second": round(rows / seconds),
        "peak_rss_mb": rss,
        "rss_after_imports_mb": 170.0,
        "import_seconds": 1.0,
        **extra,
    }


def _entry(users: int) -> dict[str, Any]:
    stages = {
        "extract": _stage(users, 2.0, counts={"extracted": users, "suppressed": 20}),
        "extract_pg": _stage(users - 1, 2.5, counts={"extracted": users - 1, "suppressed": 19}),
        "validate": _stage(users, 1.0),
        "render": _stage(5, 0.2),
        "build": _stage(users, 2.0),
        "freeze": _stage(users, 4.0, rss=1600.0),
        "encode_baseline": _stage(users, 1.0, identical_bodies=3, requests=3),
        "gate": _stage(users, 3.0, outcome={"success": True}),
        "gate_baseline": _stage(users, 2.0, outcome={"success": True}),
        "send": _stage(users, 10.0),
        "post_baseline": _stage(users, 8.0),
        "naive_baseline": _stage(100, 1.0, per_recipient_ms={"render": 4.0, "request": 6.0}),
    }
    entry: dict[str, Any] = {
        "users": users,
        "started": "2026-11-22T08:00:00+0000",
        "machine": {
            "nproc": 2,
            "cpu": "cpu",
            "mem_total": "1024 kB",
            "mem_available": "512 kB",
            "loadavg": [1.0, 1.0, 1.0],
            "python": "3.11",
            "pandas": "3",
            "pyarrow": "26",
            "great_expectations": "1",
        },
        "generate_seconds": 1.0,
        "stages": stages,
    }
    entry["ratios"] = run.ratios(entry)
    entry["checks"] = run.checks(entry)
    return entry


def test_ratios_read_each_stage_against_its_own_baseline() -> None:
    r = _entry(1000)["ratios"]

    assert r["build_freeze_vs_bare_encoder"] == 6.0
    assert r["gate_vs_bare_gate"] == 1.5
    assert r["send_vs_bare_post"] == 0.8
    # every stage once (not the PostgreSQL extract, not the baselines), per recipient sent
    assert r["per_recipient_ms"]["ours"] == pytest.approx(1000 * 22.2 / 1000)
    assert r["per_recipient_ms"]["naive"] == 10.0


def test_checks_name_what_the_two_databases_read_differently() -> None:
    problems = _entry(1000)["checks"]

    assert problems == [
        "extract read 1,000 users from SQLite but 999 from PostgreSQL (the same rows)",
        "extract suppressed: 20 from SQLite but 19 from PostgreSQL",
    ]


def test_report_states_every_target_and_the_failed_checks() -> None:
    results = {"in_process": {"100": _entry(100), "1000000": _entry(1_000_000)}, "e2e": {}}

    text = report.render_report(results)

    assert "| send ≥ 90 % of bare POST (1,000,000 users) | 80 % | **no** |" in text
    assert "| build + freeze within 3× the bare encoder (1,000,000 users) | 6.0× | **no** |" in text
    assert "largest 1,600 MB (freeze (+ outbox))" in text
    assert "1M end to end under 2 minutes | not measured yet" in text
    assert text.count("**Check failed:**") == 4
    assert "## Scaling" in text
