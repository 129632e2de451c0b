"""The keys of every row of a run, on disk, for the checks that span the whole run.

A stage that reads its rows a chunk at a time still has questions about all of them at once:
is an address in two rows of the run, which of a few addresses are anyone's in the audience.
Holding every key in a Python set would make the stage's memory grow with the audience (about
100 bytes a key: a gigabyte at ten million). Instead each chunk's keys are appended to Parquet
files in a scratch folder, and DuckDB answers over all of them with a memory limit, spilling
to that folder when it needs more (10M address keys: about 3 s and 370 MB of peak RSS, where
a pyarrow group-by in memory took 6.9 s and 2.3 GB).

``repeated`` is what a uniqueness check needs: the keys held by more than one row; a chunk
then flags its own rows holding one of them, and every copy of a key is flagged, as GX's
``expect_column_values_to_be_unique`` flags them on a whole table. ``present`` is a membership
check for a few candidates against every key.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# DuckDB's own memory (its hash tables, buffers); beyond it, it spills to the scratch folder.
MEMORY_LIMIT_MB = 256


class RunKeys:
    """Every row's keys of the named columns (strings), a chunk at a time, until ``close``.

    ``folder``: where the keys and DuckDB's spill files go (a temporary folder by default,
    removed on ``close``)."""

    def __init__(
        self,
        columns: Sequence[str],
        *,
        folder: Path | None = None,
        memory_limit_mb: int = MEMORY_LIMIT_MB,
    ) -> None:
        self.columns = tuple(columns)
        self._own = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="mailroom-keys-")) if folder is None else folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._memory_limit_mb = memory_limit_mb
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._rows = 0
        self._connection: Any = None

    def add(self, **chunk: pa.Array | pa.ChunkedArray) -> None:
        """One chunk's keys: an array of the same length for every column."""
        if set(chunk) != set(self.columns):
            raise ValueError(f"keys of {sorted(chunk)} given, {sorted(self.columns)} expected")
        if self._connection is not None:
            raise RuntimeError("keys added after the run-wide questions began")
        lengths = {len(values) for values in chunk.values()}
        if len(lengths) != 1:
            raise ValueError(f"the columns of one chunk differ in length: {sorted(lengths)}")
        for column, values in chunk.items():
            # A chunked array as it is: wrapping it again takes Arrow's slow path.
            chunked = values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])
            table = pa.table({"key": chunked.cast(pa.string())})
            writer = self._writers.get(column)
            if writer is None:
                writer = self._writers[column] = pq.ParquetWriter(
                    self._path(column), table.schema, compression="zstd"
                )
            writer.write_table(table)
        self._rows += lengths.pop()

    @property
    def rows(self) -> int:
        return self._rows

    def repeated(self, column: str) -> pa.Array:
        """The keys of ``column`` that more than one row holds (a missing key is no key)."""
        return self._query(
            f"SELECT key FROM {self._source(column)} WHERE key IS NOT NULL "
            "GROUP BY key HAVING count(*) > 1"
        )

    def present(self, column: str, candidates: Iterable[str]) -> set[str]:
        """Which of ``candidates`` some row holds in ``column``."""
        wanted = sorted(set(candidates))
        if not wanted:
            return set()
        self._connect().register("mailroom_candidates", pa.table({"key": wanted}))
        try:
            found = self._query(
                f"SELECT DISTINCT k.key FROM {self._source(column)} AS k "
                "JOIN mailroom_candidates AS c ON k.key = c.key"
            )
        finally:
            self._connection.unregister("mailroom_candidates")
        return {str(key) for key in found.to_pylist()}

    def _query(self, sql: str) -> pa.Array:
        table = self._connect().sql(sql).to_arrow_table()
        return table.column("key").combine_chunks()

    def _source(self, column: str) -> str:
        if column not in self.columns:
            raise KeyError(column)
        if column not in self._writers:  # no chunk at all: no keys
            return "(SELECT CAST(NULL AS VARCHAR) AS key WHERE false)"
        return "read_parquet('" + str(self._path(column)).replace("'", "''") + "')"

    def _path(self, column: str) -> Path:
        return self.folder / f"{self.columns.index(column)}.parquet"

    def _connect(self) -> Any:
        if self._connection is None:
            import duckdb

            for writer in self._writers.values():
                writer.close()
            spill = self.folder / "spill"
            spill.mkdir(exist_ok=True)
            self._connection = duckdb.connect(
                config={
                    "memory_limit": f"{self._memory_limit_mb}MB",
                    "temp_directory": str(spill),
                    "threads": 2,
                    "preserve_insertion_order": False,
                }
            )
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        else:
            for writer in self._writers.values():
                writer.close()
        if self._own:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> RunKeys:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
