"""The staging area: where one run's files live between tasks.

Tasks hand each other a run folder (a path or an object-storage URL in XCom), never data. Every
file a stage writes has one fixed place here, so any later stage, the approver's summary and an
operator can find it. A staging root is a local folder, or any fsspec URL (``s3://bucket/prefix``)
whose run folders ``mailroom.staging_store`` mirrors to and from a local working copy.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mailroom.errors import ValidationFailed


def is_url(location: str | Path) -> bool:
    """An object-storage URL (``s3://…``, any fsspec protocol) rather than a local folder."""
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


def local_path(location: str | Path) -> Path:
    """A local folder given as a path or a ``file://`` URL."""
    text = str(location)
    return Path(urlsplit(text).path) if text.startswith("file://") else Path(text)


def run_folder_name(run_id: str) -> str:
    """The folder name of a run id: what a path and an object key may hold. Run ids that differ
    only in other characters (``manual__x:1``, ``manual__x_1``) get the same name, so the folder
    records the run that owns it and refuses any other (``mailroom.run_record``). A run id of
    dots only (``.``, ``..``: Airflow's run-id pattern allows them) would name the campaign's
    folder or the staging root itself, and is refused."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("_") or "run"
    if not name.strip("."):
        raise ValidationFailed(
            f"run id {run_id!r} would name the run folder {name!r}: a name of dots only is, or "
            "looks like, the campaign's folder or the staging root, not a run's own; trigger the "
            "run with another run id"
        )
    return name


def run_location(staging_root: str | Path, campaign: str, run_id: str) -> str:
    """Where a run's folder lives under a staging root: ``<root>/<campaign>/<run>``."""
    if is_url(staging_root):
        return f"{str(staging_root).rstrip('/')}/{campaign}/{run_folder_name(run_id)}"
    return str(local_path(staging_root) / campaign / run_folder_name(run_id))


@dataclass(frozen=True)
class RunStaging:
    root: Path

    @classmethod
    def for_run(cls, staging_root: Path, campaign: str, run_id: str) -> RunStaging:
        return cls(staging_root / campaign / run_folder_name(run_id))

    @property
    def campaign_spec(self) -> Path:
        """The campaign spec as it was when the run started (later edits do not change a run)."""
        return self.root / "campaign.yaml"

    def create(self) -> RunStaging:
        for folder in (self.audience_dir, self.content_dir, self.batches_dir, self.gate_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def audience_dir(self) -> Path:
        return self.root / "audience"

    @property
    def snapshot(self) -> Path:
        return self.audience_dir / "snapshot.parquet"

    @property
    def suppressed(self) -> Path:
        """Who the extract left out for a suppression: still audience data, never recipients."""
        return self.audience_dir / "suppressed.parquet"

    @property
    def valid_audience(self) -> Path:
        return self.audience_dir / "valid.parquet"

    @property
    def quarantine(self) -> Path:
        return self.audience_dir / "quarantine.parquet"

    @property
    def extract_counts(self) -> Path:
        return self.audience_dir / "extract.json"

    @property
    def audience_data_docs(self) -> Path:
        """Great Expectations' Data Docs of the audience validation (``index.html`` inside),
        kept with the run."""
        return self.audience_dir / "data_docs"

    @property
    def audience_validation(self) -> Path:
        return self.audience_dir / "validation.json"

    @property
    def content_dir(self) -> Path:
        return self.root / "content"

    def content_file(self, locale: str) -> Path:
        return self.content_dir / f"{locale}.json"

    @property
    def envelopes(self) -> Path:
        return self.root / "envelopes.parquet"

    @property
    def batches_dir(self) -> Path:
        return self.root / "batches"

    @property
    def manifest(self) -> Path:
        return self.batches_dir / "manifest.json"

    @property
    def gate_dir(self) -> Path:
        return self.root / "gate"

    @property
    def gate_result(self) -> Path:
        return self.gate_dir / "result.json"

    @property
    def gate_data_docs(self) -> Path:
        """Great Expectations' Data Docs of the gate (``index.html`` inside), kept with the run."""
        return self.gate_dir / "data_docs"

    @property
    def approval(self) -> Path:
        return self.root / "approval.json"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def not_sent(self) -> Path:
        return self.root / "not_sent.csv"

    @property
    def preview_dir(self) -> Path:
        return self.root / "preview"

    @property
    def canary_dir(self) -> Path:
        return self.root / "canary"

    @property
    def dry_run_outbox(self) -> Path:
        """Where a dry run's file transport writes the requests it would have sent."""
        return self.root / "dry_run_outbox"


def json_bytes(value: Any) -> bytes:
    """What ``write_json`` writes for ``value``: the same value always gives the same bytes, so
    a file's digest can be compared with the digest of a value rebuilt elsewhere."""
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode("utf-8")


def write_json(path: Path, value: Any) -> None:
    """Write atomically: a reader never sees half a file, even if the task is killed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(json_bytes(value))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
