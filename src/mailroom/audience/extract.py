"""extract_audience: read recipients from the source, normalise, drop suppressed and duplicates.

The source is streamed in chunks and written chunk by chunk to a Parquet snapshot, so memory
stays bounded by the chunk size plus one set of seen addresses.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mailroom.addresses import normalise
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


def extract_audience(spec: CampaignSpec, *, sql_url: str | None, snapshot: Path) -> ExtractCounts:
    """Write the audience snapshot for ``spec`` to ``snapshot`` and return what was dropped.

    ``sql_url`` is the SQLAlchemy URL of the audience database (resolved from the campaign's
    connection by the caller); file sources use the spec's ``url`` instead.
    """
    suppressions = _read_suppressions(spec, sql_url)
    schema = snapshot_schema(spec.fields)
    seen: set[str] = set()
    extracted = duplicates = defaulted = kept = 0
    suppressed: Counter[str] = Counter()
    locales = set(spec.locales)

    snapshot.parent.mkdir(parents=True, exist_ok=True)
    tmp = snapshot.with_suffix(".parquet.tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for chunk in _read_audience_chunks(spec, sql_url):
            extracted += len(chunk)
            chunk = _normalise_chunk(chunk, schema)
            keys = chunk["email"].str.lower()
            reasons = keys.map(suppressions)
            is_suppressed = reasons.notna()
            suppressed.update(reasons[is_suppressed].tolist())
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
    out["email"] = out["email"].map(normalise)
    out["locale"] = out["locale"].map(_normalise_locale)
    return out.reset_index(drop=True)


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
        for email, reason in zip(frame["email"].map(normalise), reasons, strict=True):
            if email:
                result[email.lower()] = str(reason or "suppressed")
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
