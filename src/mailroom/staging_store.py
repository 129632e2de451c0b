"""Run folders on object storage: each task works on a local copy of what it needs.

A staging root is a local folder (the default: every task works in the run folder itself, nothing
is copied) or an fsspec URL such as ``s3://bucket/prefix``, so workers on different hosts share
runs without a shared filesystem. For a URL, :meth:`RunStore.working_copy` gives a task a fresh
local folder holding only the files its stage reads (``STAGES`` declares them, per stage, in one
place), and afterwards uploads the files the stage wrote, whole objects only and the stage's
marker (the manifest, the gate's result, the report) last: a reader that finds the marker finds
everything before it, and never half a file. A send shard fetches the manifest and its own
shard's batch bodies, not the whole batches folder.

Credentials come from the caller's ``storage_options`` (the Airflow adapter reads them from a
connection) or the filesystem's own defaults (for S3: the standard AWS variables, profiles and
instance roles); they are never logged.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mailroom.batches import load_manifest
from mailroom.errors import MailroomError
from mailroom.run_record import FROZEN, OWNER, Folder, RunRefused
from mailroom.staging import RunStaging, is_url, local_path

log = logging.getLogger(__name__)

_LAYOUT = RunStaging(Path())  # the run folder's layout, relative to its root


def _rel(path: Path) -> str:
    return path.as_posix()


def _folder(path: Path) -> str:
    return path.as_posix() + "/"


SPEC = _rel(_LAYOUT.campaign_spec)
MANIFEST = _rel(_LAYOUT.manifest)
SNAPSHOT = _rel(_LAYOUT.snapshot)
SUPPRESSED = _rel(_LAYOUT.suppressed)
# Written by the extract next to the snapshot: suppression rows it could not read, masked.
SUPPRESSIONS_UNREADABLE = _rel(_LAYOUT.audience_dir / "suppressions_unreadable.csv")
VALID = _rel(_LAYOUT.valid_audience)
QUARANTINE = _rel(_LAYOUT.quarantine)
EXTRACT_COUNTS = _rel(_LAYOUT.extract_counts)
VALIDATION = _rel(_LAYOUT.audience_validation)
# Who an earlier run of the campaign sent to, left out by build_envelopes (``earlier_runs``).
LEFT_OUT = _rel(_LAYOUT.audience_dir / "left_out.json")
LEFT_OUT_ROWS = _rel(_LAYOUT.audience_dir / "left_out.parquet")
ENVELOPES = _rel(_LAYOUT.envelopes)
GATE_RESULT = _rel(_LAYOUT.gate_result)
APPROVAL = _rel(_LAYOUT.approval)
REPORT = _rel(_LAYOUT.report)
NOT_SENT = _rel(_LAYOUT.not_sent)
REPORTS = "reports/"  # a frozen run's later reports (``run_record.keep_first_report``)
# Fetched for every stage when there: which run owns the folder and whether it is frozen.
RECORD = (OWNER, FROZEN)
CONTENT = _folder(_LAYOUT.content_dir)
BATCHES = _folder(_LAYOUT.batches_dir)


class StagingError(MailroomError):
    pass


@dataclass(frozen=True)
class StageFiles:
    """What one stage reads from and writes to its run folder (paths relative to the folder;
    one ending in ``/`` means every file under it)."""

    reads: tuple[str, ...] = ()  # must be there: a missing one fails the task before it starts
    optional: tuple[str, ...] = ()  # fetched when there
    batches: str = ""  # batch bodies named by the manifest: "shard" or "first_per_locale"
    writes: tuple[str, ...] = ()
    last: tuple[str, ...] = ()  # uploaded after everything else the stage wrote
    replaces: tuple[str, ...] = ()  # folders holding exactly what the stage wrote (stale removed)


STAGES: dict[str, StageFiles] = {
    "prepare": StageFiles(writes=(SPEC, OWNER)),
    "extract_audience": StageFiles(
        reads=(SPEC,),
        writes=(SNAPSHOT, SUPPRESSED, SUPPRESSIONS_UNREADABLE, EXTRACT_COUNTS),
    ),
    "validate_audience": StageFiles(
        reads=(SPEC, SNAPSHOT),
        writes=(VALID, QUARANTINE, _folder(_LAYOUT.audience_data_docs)),
        last=(VALIDATION,),
        replaces=(_folder(_LAYOUT.audience_data_docs),),
    ),
    "render_content": StageFiles(reads=(SPEC,), writes=(CONTENT,)),
    "build_envelopes": StageFiles(
        reads=(SPEC, VALID), writes=(ENVELOPES, LEFT_OUT_ROWS), last=(LEFT_OUT,)
    ),
    # Reads the audience files only for their digests (``run_inputs``), recorded in the outbox.
    "freeze_batches": StageFiles(
        reads=(SPEC, ENVELOPES, CONTENT, VALID, SNAPSHOT),
        optional=(SUPPRESSED, LEFT_OUT),
        writes=(BATCHES,),
        last=(MANIFEST, FROZEN),
        replaces=(BATCHES,),
    ),
    # The gate renders the content itself: it does not read the render stage's.
    "check_envelopes": StageFiles(
        reads=(SPEC, MANIFEST, BATCHES, VALID, VALIDATION, SNAPSHOT),
        optional=(SUPPRESSED, LEFT_OUT),
        writes=(_folder(_LAYOUT.gate_dir),),
        last=(GATE_RESULT,),
        replaces=(_folder(_LAYOUT.gate_data_docs),),
    ),
    "canary_send": StageFiles(reads=(SPEC, CONTENT), writes=(_folder(_LAYOUT.canary_dir),)),
    "summarise": StageFiles(
        reads=(SPEC, MANIFEST, EXTRACT_COUNTS, VALIDATION, GATE_RESULT, SNAPSHOT, CONTENT),
        optional=(
            QUARANTINE,
            LEFT_OUT,
            _rel(_LAYOUT.canary_dir / "result.json"),
            _rel(_LAYOUT.gate_data_docs / "index.html"),
        ),
        batches="first_per_locale",
        writes=(_folder(_LAYOUT.preview_dir),),
    ),
    # Fetched when there: the first answer is the run's (``run_record``).
    "approve": StageFiles(optional=(APPROVAL,), writes=(APPROVAL,)),
    # The guard compares every body with what the spec and the rendered content give, and holds
    # what every recipient sees to the whole audience.
    "guard_shard": StageFiles(
        reads=(SPEC, MANIFEST, CONTENT, SNAPSHOT), optional=(SUPPRESSED,), batches="shard"
    ),
    "send_shard": StageFiles(
        reads=(SPEC, MANIFEST, CONTENT, SNAPSHOT),
        optional=(SUPPRESSED,),
        batches="shard",
        writes=(_folder(_LAYOUT.dry_run_outbox),),
    ),
    # Runs whatever happened before (trigger rule all_done): every input may be missing. A
    # frozen run's first report stands: it is fetched to be compared, and never uploaded again.
    "reconcile": StageFiles(
        optional=(
            SPEC,
            MANIFEST,
            EXTRACT_COUNTS,
            VALIDATION,
            QUARANTINE,
            LEFT_OUT,
            LEFT_OUT_ROWS,
            APPROVAL,
            REPORT,
            NOT_SENT,
            REPORTS,
        ),
        writes=(NOT_SENT, REPORTS),
        last=(REPORT,),
    ),
}


@dataclass
class Transfer:
    """What one working copy fetched and uploaded (relative path → bytes)."""

    fetched: dict[str, int] = field(default_factory=dict)
    uploaded: dict[str, int] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    fetch_seconds: float = 0.0
    upload_seconds: float = 0.0


class RunStore:
    """One run's folder at ``location``: a local path (used in place) or an fsspec URL."""

    def __init__(
        self,
        location: str | Path,
        *,
        storage_options: Mapping[str, Any] | None = None,
        work_dir: Path | None = None,
    ) -> None:
        self.location = str(location).rstrip("/") if is_url(location) else str(location)
        self.remote = is_url(location)
        self.work_dir = work_dir
        self.last = Transfer()
        self._options = dict(storage_options or {})
        self._fs: Any = None
        self._base = ""

    def __repr__(self) -> str:  # never the storage options: they hold credentials
        return f"RunStore({safe_location(self.location)!r})"

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            options = {"skip_instance_cache": True, "use_listings_cache": False, **self._options}
            self._fs, self._base = fsspec.core.url_to_fs(self.location, **options)
            self._base = self._base.rstrip("/")
        return self._fs

    @contextmanager
    def working_copy(self, stage: str, *, shard: tuple[int, int] | None = None) -> Iterator[Path]:
        """The run folder for one task of ``stage``: the folder itself when it is local;
        otherwise a fresh local folder with the stage's inputs, whose outputs are uploaded when
        the task ends (also when it fails: a failed gate's result and Data Docs, or a report
        stating why a run is incomplete, are what an operator looks at), then removed."""
        if not self.remote:
            yield local_path(self.location)
            return
        files = STAGES.get(stage)
        if files is None:
            raise StagingError(f"unknown stage {stage!r}: declare its files in STAGES")
        if files.batches == "shard" and shard is None:
            raise StagingError(f"stage {stage!r} needs its shard (index, count)")
        self.last = Transfer()
        root = Path(tempfile.mkdtemp(prefix=f"mailroom-{stage}-", dir=self.work_dir))
        try:
            before = self._fetch(root, stage, files, shard)
            try:
                yield root
            except RunRefused:
                raise  # refused before writing: nothing to upload, nothing stale to remove
            except Exception:
                try:
                    self._upload(root, stage, files, before)
                except Exception:
                    log.exception("staging: %s failed, and so did uploading what it wrote", stage)
                raise
            self._upload(root, stage, files, before)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def listing(self) -> dict[str, int]:
        """Every object of the run folder: relative path → size."""
        if not self.remote:
            root = local_path(self.location)
            return {
                _rel(p.relative_to(root)): p.stat().st_size
                for p in sorted(root.rglob("*"))
                if p.is_file()
            }
        found = self.fs.find(self._base, detail=True)
        prefix = self._base + "/"
        return {
            str(name)[len(prefix) :]: int(info.get("size") or 0)
            for name, info in found.items()
            if info.get("type", "file") == "file" and str(name).startswith(prefix)
        }

    def record(self) -> Folder:
        """The run folder as ``run_record`` checks it, before any working copy is made."""
        if not self.remote:
            return Folder.local(local_path(self.location))

        def read(rel: str) -> bytes | None:
            try:
                return bytes(self.fs.cat_file(f"{self._base}/{rel}"))
            except FileNotFoundError:
                return None

        return Folder.listed(safe_location(self.location), self.listing(), read)

    def download(self, dest: Path) -> Transfer:
        """Copy the whole run folder to ``dest`` (for an operator: Data Docs, not_sent.csv)."""
        transfer = Transfer()
        started = time.monotonic()
        listing = self.listing()
        if not listing:
            raise StagingError(f"no run folder at {safe_location(self.location)}")
        if self.remote:
            self._get(dest, listing)
        else:
            shutil.copytree(local_path(self.location), dest, dirs_exist_ok=True)
        transfer.fetched = listing
        transfer.fetch_seconds = time.monotonic() - started
        return transfer

    # -- fetching and uploading ------------------------------------------------------------------
    def _fetch(
        self, root: Path, stage: str, files: StageFiles, shard: tuple[int, int] | None
    ) -> dict[str, tuple[int, int]]:
        started = time.monotonic()
        listing = self.listing()
        wanted: dict[str, int] = {}
        missing = []
        for entry in files.reads:
            matched = _matching(listing, entry)
            if not matched and not entry.endswith("/"):
                missing.append(entry)
            wanted.update(matched)
        for entry in (*files.optional, *RECORD):
            wanted.update(_matching(listing, entry))
        self._require(stage, missing)
        self._get(root, wanted)
        if files.batches:
            manifest = load_manifest(root / MANIFEST)
            if files.batches == "shard":
                assert shard is not None
                entries = manifest.shard(*shard)
            else:
                entries = list({b.locale: b for b in reversed(manifest.batches)}.values())
            names = [_rel(_LAYOUT.batches_dir / b.file) for b in entries]
            self._require(stage, [n for n in names if n not in listing])
            bodies = {n: listing[n] for n in names}
            self._get(root, bodies)
            wanted.update(bodies)
        self.last.fetched = wanted
        self.last.fetch_seconds = time.monotonic() - started
        log.info(
            "staging: %s fetched %d file(s), %d bytes, in %.2fs from %s",
            stage,
            len(wanted),
            sum(wanted.values()),
            self.last.fetch_seconds,
            safe_location(self.location),
        )
        return {rel: _stamp(root / rel) for rel in wanted}

    def _require(self, stage: str, missing: list[str]) -> None:
        if missing:
            writers = sorted({s for m in missing for s, f in STAGES.items() if _declares(f, m)})
            raise StagingError(
                f"{stage}: {', '.join(missing)} missing from the run folder "
                f"{safe_location(self.location)} (written by {', '.join(writers) or 'no stage'}: "
                "did it finish, with the same staging root and credentials?)"
            )

    def _get(self, root: Path, files: Mapping[str, int]) -> None:
        if not files:
            return
        names = sorted(files)
        for rel in names:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get([f"{self._base}/{rel}" for rel in names], [str(root / rel) for rel in names])

    def _upload(
        self, root: Path, stage: str, files: StageFiles, before: dict[str, tuple[int, int]]
    ) -> None:
        started = time.monotonic()
        written = [
            rel
            for rel in _files_under(root)
            if any(_covers(entry, rel) for entry in (*files.writes, *files.last))
            and before.get(rel) != _stamp(root / rel)
        ]
        first = [rel for rel in written if rel not in files.last]
        last = [rel for rel in written if rel in files.last]
        self._put(root, first)
        if files.replaces:
            local = set(_files_under(root))
            stale = [
                rel
                for rel in self.listing()
                if any(_covers(folder, rel) for folder in files.replaces) and rel not in local
            ]
            if stale:
                self.fs.rm([f"{self._base}/{rel}" for rel in stale])
            self.last.removed = stale
        self._put(root, last)
        self.last.uploaded = {rel: (root / rel).stat().st_size for rel in written}
        self.last.upload_seconds = time.monotonic() - started
        log.info(
            "staging: %s uploaded %d file(s), %d bytes, in %.2fs to %s%s",
            stage,
            len(written),
            sum(self.last.uploaded.values()),
            self.last.upload_seconds,
            safe_location(self.location),
            f"; removed {len(self.last.removed)} stale" if self.last.removed else "",
        )

    def _put(self, root: Path, names: Iterable[str]) -> None:
        names = list(names)
        if names:
            self.fs.put(
                [str(root / rel) for rel in names], [f"{self._base}/{rel}" for rel in names]
            )


def safe_location(location: str) -> str:
    """A location fit for logs and messages: no user or password in it."""
    parts = urlsplit(location)
    if not parts.scheme or "@" not in parts.netloc:
        return location
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _covers(entry: str, rel: str) -> bool:
    return rel.startswith(entry) if entry.endswith("/") else rel == entry


def _declares(files: StageFiles, rel: str) -> bool:
    return any(_covers(entry, rel) for entry in (*files.writes, *files.last))


def _matching(listing: Mapping[str, int], entry: str) -> dict[str, int]:
    return {rel: size for rel, size in listing.items() if _covers(entry, rel)}


def _files_under(root: Path) -> list[str]:
    return [_rel(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_file()]


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
