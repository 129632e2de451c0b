"""One run's identity and folder, and where a project keeps its campaigns, templates and catalogs.

Every task rebuilds its ``Run`` from the small dict XCom carries (``Run.from_xcom``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailroom.campaign_spec import CampaignSpec, load_campaign_file
from mailroom.staging import RunStaging


@dataclass(frozen=True)
class ProjectPaths:
    """Where campaign specs, templates and catalogs live (``include/`` in this repository)."""

    campaigns: Path
    templates: Path
    translations: Path

    @classmethod
    def under(cls, include_dir: Path) -> ProjectPaths:
        return cls(
            include_dir / "campaigns", include_dir / "templates", include_dir / "translations"
        )


@dataclass(frozen=True)
class Run:
    """One run's identity and folder, rebuilt in every task from the XCom dict.

    ``staging`` is the folder a task works in; ``location`` is where the run's folder lives
    (the same folder, or an object-storage URL of which ``staging`` is a working copy).
    """

    campaign: str
    run_id: str
    staging: RunStaging
    shard_count: int
    dry_run: bool
    location: str | None = None

    @property
    def run_key(self) -> str:
        return f"{self.campaign}/{self.run_id}"

    @property
    def spec_copy(self) -> Path:
        return self.staging.campaign_spec

    def where(self, path: Path) -> str:
        """Where a file of the working folder lives, as people and later tasks find it."""
        if self.location is None or self.location == str(self.staging.root):
            return str(path)
        rel = path.relative_to(self.staging.root).as_posix()
        return self.location if rel == "." else f"{self.location}/{rel}"

    def spec(self) -> CampaignSpec:
        """The run's frozen copy of the campaign spec, read as strictly as the original."""
        return load_campaign_file(self.spec_copy)

    def to_xcom(self) -> dict[str, Any]:
        return {
            "campaign": self.campaign,
            "run_id": self.run_id,
            "run_dir": self.location or str(self.staging.root),
            "shard_count": self.shard_count,
            "dry_run": self.dry_run,
        }

    @classmethod
    def from_xcom(cls, data: dict[str, Any], *, working_dir: Path | None = None) -> Run:
        """The run of a task; ``working_dir`` is its local copy of a run folder kept elsewhere."""
        return cls(
            data["campaign"],
            data["run_id"],
            RunStaging(working_dir or Path(data["run_dir"])),
            int(data["shard_count"]),
            bool(data["dry_run"]),
            str(data["run_dir"]),
        )
