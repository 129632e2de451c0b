"""extract_audience: read recipients from the source, normalise, drop suppressed and duplicates.

The source is streamed in chunks and written chunk by chunk to a Parquet snapshot, so memory
stays bounded by the chunk size plus one set of seen addresses.

Dedupe and suppression compare ``addresses.address_key``, the one key of a mailbox: the IDN and
punycode spellings of one mailbox, its case variants, and a spelling with an invisible character
or a fullwidth form are one person, who gets the message once (and whose suppression, however it
is spelt, holds). Distinct mailboxes (``ann@``, ``a.nn@``, ``ann+x@``) stay distinct.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mailroom.addresses import address_key, normalise, readable
from mailroom.campaign_spec import CampaignSpec
from mailroom.errors import AudienceError

log = logging.getLogger(__name__)

CHUNK_ROWS = 100_000
REQUIRED_COLUMNS = ("user_id", "email", "locale")


@dataclass(frozen=True)
class ExtractCounts:
    extracted: int
    suppressed: int
    suppressed_by_reason: dict[str, int]
    duplicates: int
    locale_defaulted: int
    kept: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "extracted": self.extracted,
            "suppressed": self.suppressed,
            "suppressed_by_reason": self.suppressed_by_reason,
            "duplicates": self.duplicates,
            "locale_defaulted": self.locale_defaulted,
            "kept": self.kept,
        }


def snapshot_schema(fields: tuple[str, ...]) -> pa.Schema:
    columns = ["user_id", "email", "locale", *[f for f in fields if f not in REQUIRED_COLUMNS]]
    return pa.schema([(c, pa.string()) for c in columns])


SUPPRESSED_SCHEMA = pa.schema([("user_id", pa.string()), ("email", pa.string())])


def extract_audience(
    spec: CampaignSpec, *, sql_url: str | None, snapshot: Path, suppressed_out: Path | None = None
) -> ExtractCounts:
    """Write the audience snapshot for ``spec`` to ``snapshot`` and return what was dropped.

    ``sql_url`` is the SQLAlchemy URL of the audience database (resolved from the campaign's
    connection by the caller); file sources use the spec's ``url`` instead. ``suppressed_out``
    receives who was left out for a suppression (user id and address key): never recipients,
    but still people whose data no shared part of a request may show (``checks.audience_data``).
    """
    suppressions = _read_suppressions(spec, sql_url)
    schema = snapshot_schema(spec.fields)
    seen: set[str] = set()
    extracted = duplicates = defaulted = kept = 0
    suppressed: Counter[str] = Counter()
    locales = set(spec.locales)

    snapshot.parent.mkdir(parents=True, exist_ok=True)
    tmp = snapshot.with_suffix(".parquet.tmp")
    with ExitStack() as files:
        writer = files.enter_context(pq.ParquetWriter(tmp, schema))
        left_out_writer = (
            files.enter_context(pq.ParquetWriter(_tmp(suppressed_out), SUPPRESSED_SCHEMA))
            if suppressed_out is not None
            else None
        )
        for chunk in _read_audience_chunks(spec, sql_url):
            extracted += len(chunk)
            chunk = _normalise_chunk(chunk, schema)
            keys = address_keys(chunk["email"])
            reasons = keys.map(suppressions)
            is_suppressed = reasons.notna()
            suppressed.update(reasons[is_suppressed].tolist())
            if left_out_writer is not None and is_suppressed.any():
                left_out_writer.write_table(
                    pa.table(
                        {
                            "user_id": chunk.loc[is_suppressed, "user_id"].tolist(),
                            "email": keys[is_suppressed].tolist(),
                        },
                        schema=SUPPRESSED_SCHEMA,
                    )
                )
            chunk, keys = chunk[~is_suppressed], keys[~is_suppressed]

            # Membership row by row: ``isin(seen)`` would rebuild a hash table of every address
            # seen so far for each chunk, quadratic in the audience.
            earlier = pd.Series([k in seen for k in keys], index=keys.index, dtype=bool)
            is_duplicate = keys.notna() & (keys.duplicated() | earlier)
            duplicates += int(is_duplicate.sum())
            chunk, keys = chunk[~is_duplicate], keys[~is_duplicate]
            seen.update(keys.dropna().tolist())

            unknown = ~chunk["locale"].isin(locales)
            if unknown.any():
                chunk.loc[unknown, "locale"] = chunk.loc[unknown, "locale"].map(
                    lambda v: _locale_match(v, locales, spec.default_locale)
                )
                defaulted += int(unknown.sum())
            kept += len(chunk)
            writer.write_table(pa.Table.from_pandas(chunk, schema=schema, preserve_index=False))
            log.info("extract: %d rows read, %d kept so far", extracted, kept)
    tmp.replace(snapshot)
    if suppressed_out is not None:
        _tmp(suppressed_out).replace(suppressed_out)
    counts = ExtractCounts(
        extracted=extracted,
        suppressed=sum(suppressed.values()),
        suppressed_by_reason=dict(sorted(suppressed.items())),
        duplicates=duplicates,
        locale_defaulted=defaulted,
        kept=kept,
    )
    log.info("extract: done %s", counts.to_dict())
    return counts


def _normalise_chunk(chunk: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    missing = [c for c in schema.names if c not in chunk.columns]
    if missing:
        raise AudienceError(f"audience source lacks required column(s): {', '.join(missing)}")
    out = pd.DataFrame(index=chunk.index)
    for column in schema.names:
        values = chunk[column]
        out[column] = values.where(values.isna(), values.astype(str)).astype(object)
    out["email"] = _sendable(out["email"])
    out["locale"] = out["locale"].map(_normalise_locale)
    return out.reset_index(drop=True)


def _sendable(emails: pd.Series) -> pd.Series:
    """What is sent: ``normalise`` (trimmed, the domain lower-cased and IDNA-encoded, the local
    part's case kept) of the address as it reads, so that an invisible character or a fullwidth
    form pasted into the source does not make an undeliverable address that hides a duplicate.
    Only non-ASCII values need reading; most of an audience is ASCII."""
    text = emails.astype("string[pyarrow]")
    non_ascii = ~text.str.isascii().fillna(True).astype(bool)
    values = emails.tolist()
    if non_ascii.any():
        for i in non_ascii.to_numpy().nonzero()[0]:
            values[i] = readable(values[i])
    return pd.Series([normalise(v) for v in values], index=emails.index, dtype=object)


# Text, an "@", and text without one: ``rpartition("@")`` gives a local part and a domain.
_SHAPED = r"(?s)^.+@[^@]+$"


def address_keys(emails: pd.Series) -> pd.Series:
    """``address_key`` of every value of ``emails`` as ``_sendable`` writes them (normalised),
    ``None`` where there is no address. For ASCII values, most of an audience, the key is the
    lower-cased value when an ``@`` has text on both sides (``normalise`` already trimmed it and
    encoded the domain), computed by Arrow; the rest go through ``address_key`` itself."""
    text = emails.astype("string[pyarrow]")
    is_ascii = text.str.isascii().fillna(False).astype(bool)
    low = text.str.lower()
    shaped = (is_ascii & low.str.contains(_SHAPED, regex=True)).fillna(False).astype(bool)
    keys = low.astype(object).where(shaped, None)
    rest = ~is_ascii & text.notna()
    if rest.any():
        keys[rest] = emails[rest].map(address_key)
    return keys


def _tmp(path: Path) -> Path:
    """Where a file is written before it is moved into place whole."""
    return path.with_suffix(".parquet.tmp")


@lru_cache(maxsize=4096)
def _normalise_locale(value: object) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    language, _, region = value.strip().replace("-", "_").partition("_")
    return f"{language.lower()}_{region.upper()}" if region else language.lower()


def _locale_match(value: object, locales: set[str], default: str) -> str:
    """A user's locale the campaign has, else its language, else the campaign's default."""
    if isinstance(value, str):
        if value in locales:
            return value
        language = value.partition("_")[0]
        if language in locales:
            return language
    return default


def _read_audience_chunks(spec: CampaignSpec, sql_url: str | None) -> Iterator[pd.DataFrame]:
    source = spec.audience
    if source.query:
        yield from _sql_chunks(_require_url(sql_url, spec), source.query)
    elif source.url:
        yield from _file_chunks(source.url)


def _read_suppressions(spec: CampaignSpec, sql_url: str | None) -> dict[str, str]:
    source = spec.audience
    frames: Iterator[pd.DataFrame]
    if source.suppressions_query:
        frames = _sql_chunks(_require_url(sql_url, spec), source.suppressions_query)
    elif source.suppressions_url:
        frames = _file_chunks(source.suppressions_url)
    else:
        return {}
    result: dict[str, str] = {}
    for frame in frames:
        if "email" not in frame.columns:
            raise AudienceError("suppression source lacks the 'email' column")
        reasons = (
            frame["reason"]
            if "reason" in frame.columns
            else pd.Series("suppressed", index=frame.index)
        )
        for key, reason in zip(frame["email"].map(address_key), reasons, strict=True):
            if key:
                result[key] = str(reason or "suppressed")
    return result


def _require_url(sql_url: str | None, spec: CampaignSpec) -> str:
    if not sql_url:
        raise AudienceError(
            f"campaign {spec.name!r} reads its audience through connection "
            f"{spec.audience.connection_id!r}, which resolved to no database URL"
        )
    return sql_url


def _sql_chunks(sql_url: str, query: str) -> Iterator[pd.DataFrame]:
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError

    engine = sa.create_engine(sql_url)
    try:
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True).execute(sa.text(query))
            columns = list(result.keys())
            # Rows as plain tuples: a frame built from SQLAlchemy's rows costs a failed
            # attribute lookup per row. (Not from the DB-API cursor directly: with a
            # server-side cursor SQLAlchemy has already buffered the first row.)
            while rows := result.fetchmany(CHUNK_ROWS):
                yield pd.DataFrame(list(map(tuple, rows)), columns=columns)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise AudienceError(
            "cannot read the audience database "
            f"({engine.url.render_as_string(hide_password=True)}): "
            f"{reason}"
        ) from exc
    finally:
        engine.dispose()


def _file_chunks(url: str) -> Iterator[pd.DataFrame]:
    path = url.removeprefix("file://")
    try:
        if path.endswith(".parquet"):
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=CHUNK_ROWS):
                yield batch.to_pandas()
        elif path.endswith(".csv"):
            yield from pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS)
        else:
            raise AudienceError(f"audience url {url!r}: only .csv and .parquet files are supported")
    except FileNotFoundError as exc:
        raise AudienceError(f"audience file not found: {url}") from exc
