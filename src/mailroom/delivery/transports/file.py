"""The file transport: writes what would be sent, for dry runs and previews."""

from __future__ import annotations

from pathlib import Path

from mailroom.checks.envelope_guard import GuardedBody
from mailroom.delivery.transports.base import Delivery, Transport


class FileTransport(Transport):
    name = "file"

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)

    def _deliver(self, guarded: GuardedBody) -> Delivery:
        path = self.out_dir / f"{guarded.sha256}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(guarded.body)
        tmp.replace(path)
        return Delivery(message_id=f"file-{guarded.sha256[:22]}", status=200)
