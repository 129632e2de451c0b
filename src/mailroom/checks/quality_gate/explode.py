"""The frozen bodies read back into the rows the rules judge: one per personalization and one
per batch (the columns: ``rows``).

Each body is read one of two ways, which give the same rows:

* **the regular shape** (what Mailroom writes: every personalization exactly ``to`` +
  ``substitutions`` + ``headers``, every value a string, every ``to`` entry exactly an ``email``,
  nothing else anywhere) is parsed by Arrow's JSON reader against a strict schema, a few dozen
  requests at a time, and checked column-wise (``regular``);
* **anything else** (an unknown field, a missing or null value, another type, a duplicate key,
  a line break, non-ASCII in an address, not JSON at all) fails that strict parse, and that body
  is read with ``json.loads`` and checked one personalization at a time (``generic``).

The strict parse only decides which of the two reads a body; both produce the same columns
(``tests/unit/test_quality_gate.py`` compares them on every kind of irregular body), and every
rule is then judged by the same Great Expectations suites (``rules``). The next group of requests
is read, hashed and parsed in a second thread while the current one is checked (``bodies``), and
the audience's unsubscribe tokens are made ahead in a second process meanwhile
(``unsubscribe.TokensInBackground``, started by ``audience.audience_tokens``).

Memory stays flat in the run's size: the personalization rows of a few groups are spilled to a
scratch folder as soon as they are made, and read back a chunk at a time for GX
(``ExplodedRun.personalization_chunks``) once every row of the run is made, each row then
carrying whether any other personalization of the run has its address (``rows.ONCE_IN_RUN``).
Spilling the rows costs a fraction of what reading and parsing every body a second time would.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mailroom.batches import load_manifest
from mailroom.campaign_spec import CampaignSpec
from mailroom.checks.quality_gate.audience import Audience, audience_tokens
from mailroom.checks.quality_gate.bodies import read_groups
from mailroom.checks.quality_gate.generic import explode_generic
from mailroom.checks.quality_gate.regular import RegularShape, explode_regular
from mailroom.checks.quality_gate.rows import (
    BATCH_COLUMNS,
    PERSONALIZATION_COLUMNS,
    Columns,
    personalization_frame,
)
from mailroom.run_keys import RunKeys
from mailroom.unsubscribe import TokensInBackground

# Personalization rows GX validates at a time.
CHUNK_ROWS = 250_000
# Personalization rows spilled at a time (a few groups of bodies): fewer, larger writes.
SPILL_ROWS = 200_000


class ExplodedRun:
    """A run's rows: its batch rows (``batches``, one per request: a frame) and its
    personalization rows, spilled to a scratch folder (which ``close`` removes) and read back
    ``chunk_rows`` at a time with each row's ``ONCE_IN_RUN``.

    Nobody twice, over the whole run: an address found in the audience is at one audience row
    (``audience.Audience`` tells the audience's own rows apart by their addresses), so two
    personalizations have one address exactly when they have one audience row, which two bits
    per audience row remember (seen, seen again). The few addresses outside the audience are
    kept on disk (``run_keys.RunKeys``) and asked about once."""

    def __init__(self, audience_rows: int) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mailroom-gate-"))
        self.personalizations = 0
        self.batches = pd.DataFrame()
        self._seen = np.zeros((audience_rows + 7) // 8, dtype=np.uint8)
        self._again = np.zeros_like(self._seen)
        self._outsiders = RunKeys(["email_key"], folder=self.folder / "outsiders")
        self._outsiders_open = True
        self._outsiders_twice: pa.Array | None = None
        self._finished = False
        self._spilled = self.folder / "personalizations.arrow"
        self._schema: pa.Schema | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._waiting: list[pa.Table] = []
        self._waiting_rows = 0

    def __enter__(self) -> ExplodedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, rows: pa.Table) -> None:
        """Personalization rows (``Columns.table``), spilled once ``SPILL_ROWS`` are waiting."""
        if self._finished:
            raise RuntimeError("personalization rows added after the run's were all counted")
        if self._schema is None:
            self._schema = rows.schema
        if rows.num_rows:
            self._count(rows)
            self._waiting.append(rows)
            self._waiting_rows += rows.num_rows
            self.personalizations += rows.num_rows
        if self._waiting_rows >= SPILL_ROWS:
            self._spill()

    def _count(self, rows: pa.Table) -> None:
        at = rows.column("audience_row").to_numpy()
        found = at[at >= 0]
        if len(found):
            found, times = np.unique(found, return_counts=True)
            byte, bit = found >> 3, np.left_shift(1, found & 7).astype(np.uint8)
            again = (times > 1) | ((self._seen[byte] & bit) != 0)
            np.bitwise_or.at(self._again, byte[again], bit[again])
            np.bitwise_or.at(self._seen, byte, bit)
        key = rows.column("email_key")
        outside = (at < 0) & key.is_valid().to_numpy()
        if outside.any():
            self._outsiders.add(email_key=key.filter(pa.array(outside)).combine_chunks())

    def _spill(self) -> None:
        assert self._schema is not None
        if self._writer is None:
            self._writer = pa.ipc.new_file(
                str(self._spilled),
                self._schema,
                options=pa.ipc.IpcWriteOptions(compression="lz4"),
            )
        if self._waiting_rows:
            self._writer.write_table(pa.concat_tables(self._waiting))
        self._waiting, self._waiting_rows = [], 0

    def finish(self) -> None:
        """Every row added: spill what waits, and find the addresses outside the audience that
        more than one personalization has."""
        if self._finished:
            return
        self._finished = True
        if self._schema is not None:
            self._spill()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        try:
            self._outsiders_twice = (
                self._outsiders.repeated("email_key")
                if self._outsiders.rows
                else pa.array([], pa.string())
            )
        finally:
            self._close_outsiders()

    def once_in_run(self, rows: pa.Table) -> pa.Array:
        """``ONCE_IN_RUN`` of personalization rows: no other personalization of the run has
        their address (missing where there is none)."""
        self.finish()
        if self._outsiders_twice is None:
            raise RuntimeError("the addresses outside the audience could not be counted")
        at = rows.column("audience_row").to_numpy()
        key = rows.column("email_key")
        once = np.ones(len(at), dtype=bool)
        inside = at >= 0
        found = at[inside]
        bit = np.left_shift(1, found & 7).astype(np.uint8)
        once[inside] = (self._again[found >> 3] & bit) == 0
        outside = ~inside
        if outside.any() and len(self._outsiders_twice):
            twice = pc.is_in(key.filter(pa.array(outside)), value_set=self._outsiders_twice)
            once[outside] = ~twice.to_numpy(zero_copy_only=False)
        return pa.array(once, mask=key.is_null().to_numpy(zero_copy_only=False))

    def personalization_chunks(
        self, chunk_rows: int = CHUNK_ROWS, *, with_keys: bool = False
    ) -> Iterator[pd.DataFrame]:
        """The personalization rows as GX validates them (``rows.personalization_frame``),
        ``chunk_rows`` at a time, in the order they were made (one empty frame for none)."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
        self.finish()
        if self._schema is None:
            yield self._frame(Columns(PERSONALIZATION_COLUMNS).table(), with_keys)
            return
        with pa.OSFile(str(self._spilled)) as source:
            reader = pa.ipc.open_file(source)
            pending = pa.Table.from_batches([], schema=self._schema)
            made = False
            for index in range(reader.num_record_batches):
                batch = pa.Table.from_batches([reader.get_batch(index)])
                pending = pa.concat_tables([pending, batch])
                while pending.num_rows >= chunk_rows:
                    chunk = pending.slice(0, chunk_rows)
                    pending = pending.slice(chunk_rows)
                    made = True
                    yield self._frame(chunk, with_keys)
            if pending.num_rows or not made:
                yield self._frame(pending, with_keys)

    def _frame(self, rows: pa.Table, with_keys: bool) -> pd.DataFrame:
        return personalization_frame(rows, self.once_in_run(rows), with_keys=with_keys)

    def _close_outsiders(self) -> None:
        if self._outsiders_open:
            self._outsiders_open = False
            self._outsiders.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._close_outsiders()
        shutil.rmtree(self.folder, ignore_errors=True)


def explode_run(
    spec: CampaignSpec,
    *,
    manifest_path: Path,
    audience: Audience,
    shared: Mapping[str, Mapping[str, Any]],
    staged: Mapping[str, str],
    audience_data: Mapping[str, int],
    strict_reader: bool = True,
) -> ExplodedRun:
    """Every frozen body read back: one row per personalization (spilled) and one per batch.

    ``email_key`` is the lower-cased address, as the run-wide check of nobody twice needs.
    ``shared``: each batch's shared part as the approved inputs give it, by body digest
    (``batches.shared_parts``). ``staged``: the digest each batch must have, as the outbox
    staged it (by batch id; none for a batch whose inputs are not the recorded ones).
    ``audience_data``: what ``checks.audience_data`` finds in each batch's shared part as the
    approved inputs give it, by body digest. ``strict_reader=False`` reads every body the generic
    way (for tests that compare the two readers)."""
    manifest = load_manifest(manifest_path)
    shape = RegularShape(spec) if strict_reader else None
    people = Columns(PERSONALIZATION_COLUMNS)
    batch_rows = Columns(BATCH_COLUMNS)
    parse = shape.parse if shape is not None else None
    run = ExplodedRun(audience.rows)
    try:
        groups = read_groups(
            manifest.batches, manifest_path.parent, parse, shared, staged, audience_data
        )
        for group in groups:
            if group.parsed is not None and shape is not None:
                explode_regular(group, group.parsed, audience, shape, people, batch_rows)
            else:
                # Something in this group is irregular: find which, and read only those slowly.
                for one in group.split():
                    body = shape.parse(one.datas) if shape is not None else None
                    if body is not None and shape is not None:
                        explode_regular(one, body, audience, shape, people, batch_rows)
                    else:
                        explode_generic(one, audience, people, batch_rows)
            run.add(people.table())
        run.add(people.table())  # the columns, should there be no body at all
        run.batches = batch_rows.frame()
        run.finish()
    except BaseException:
        run.close()
        raise
    return run


def explode_batches(
    spec: CampaignSpec,
    *,
    manifest_path: Path,
    valid_audience: Path,
    secret: bytes,
    shared: Mapping[str, Mapping[str, Any]],
    staged: Mapping[str, str],
    audience_data: Mapping[str, int],
    strict_reader: bool = True,
    tokens: TokensInBackground | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``explode_run`` as two whole frames, for a look at a small run: every personalization
    row as GX validates it, with its ``email_key`` too, and every batch row. ``tokens``: the
    audience's unsubscribe tokens, already being made (``audience_tokens``); by default they
    are started here. Either way they are closed when this returns."""
    with (
        tokens or audience_tokens(spec, secret, valid_audience) as made,
        Audience(spec, secret, valid_audience, made) as audience,
        explode_run(
            spec,
            manifest_path=manifest_path,
            audience=audience,
            shared=shared,
            staged=staged,
            audience_data=audience_data,
            strict_reader=strict_reader,
        ) as run,
    ):
        people = pd.concat(
            list(run.personalization_chunks(max(run.personalizations, 1), with_keys=True)),
            ignore_index=True,
        )
        return people, run.batches
