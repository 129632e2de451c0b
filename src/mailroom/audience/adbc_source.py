"""The audience query read through ADBC, straight into Arrow, as text the SQLAlchemy reader
would have produced.

``adbc_target`` turns the SQLAlchemy URL of a SQLite or PostgreSQL database into an ADBC
driver and URI; ``text_chunks`` runs the query and yields it in chunks of exactly the SQLAlchemy
reader's size, each column the campaign needs as an Arrow string array (or, for a column of
numbers or booleans, as the Python values the DB-API driver returns, for the SQLAlchemy
reader's own text rule). Anything ADBC would not read as the DB-API driver does raises
``NotExact``, and the caller reads the audience through SQLAlchemy instead: so both readers
give one result, errors included.

What ADBC reads differently, and so sends the audience back to SQLAlchemy:

- SQLite keeps a type per value. ADBC picks one per column from the first chunk and converts
  the rest (an integer read as text, a REAL in SQLite's own spelling), and does not check text
  is UTF-8. A column the campaign reads must come back as text, or as integers; text that may
  have been a REAL, or a column of digits with NULLs (integers, to the SQLAlchemy reader,
  written "7.0"), is sent back, as is any value that is not UTF-8 (the SQLAlchemy reader fails
  naming the column, or reads a BLOB with U+FFFD).
- PostgreSQL types are fixed per column: those read the same way are listed below; a column of
  another type is sent back.
- The SQL itself: SQLAlchemy's ``text()`` reads ``:name`` as a bind parameter, and SQLite's
  DB-API driver refuses a second statement that ADBC would silently skip.
- Any ADBC or Arrow error (a SQL error too: SQLAlchemy then raises the error the run reports).
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class NotExact(Exception):
    """The ADBC reader would not give what the SQLAlchemy reader gives. The message says why,
    never with a value from the source: it is logged."""


@dataclass(frozen=True)
class AdbcTarget:
    driver: Literal["sqlite", "postgresql"]
    uri: str  # a file path (SQLite) or a libpq connection string (PostgreSQL): may hold a password


# SQLAlchemy's own pattern for a ``:name`` bind parameter in ``text()`` (TextClause).
_BIND_PARAMETER = re.compile(r"(?<![:\w\x5c]):(\w+)(?!:)", re.UNICODE)
_SQLITE_DRIVERS = frozenset({"sqlite", "sqlite+pysqlite"})
_POSTGRES_DRIVERS = frozenset({"postgresql", "postgresql+psycopg2", "postgresql+psycopg"})

# PostgreSQL types (``POSTGRESQL:type`` of ADBC's field metadata) the DB-API drivers return as
# ADBC does: text as ``str``; integers, booleans, float8 and bytea as the same Python values.
_PG_TEXT = frozenset({"text", "varchar", "bpchar", "name"})
_PG_INTEGER = frozenset({"int2", "int4", "int8"})
_PG_VALUES = frozenset({"bool", "float8", "bytea"})
# Types of a column the campaign does not read that the DB-API drivers read without fail (a
# date or a timestamp out of Python's range fails there, and JSON is parsed).
_PG_UNREAD = _PG_TEXT | _PG_INTEGER | _PG_VALUES | {"float4", "numeric", "uuid", "oid", "char"}

# What text in a SQLite column may be when the value was a REAL: SQLite's spelling (1.5,
# 1.0e+20, Inf) or ADBC's (1.500000e+00, inf) of a REAL it converted to text.
_REAL_TEXT = r"^-?(?:[0-9]+\.[0-9]+(?:e[+-][0-9]+)?|[Ii]nf|nan)$"
_REAL_STARTS = np.frombuffer(b"-0123456789Iin", np.uint8)
_INTEGER_TEXT = r"^-?[0-9]+$"


def adbc_target(sql_url: str) -> AdbcTarget:
    """The ADBC driver and URI that open the database ``sql_url`` (a SQLAlchemy URL) names, as
    SQLAlchemy's own driver would open it; ``NotExact`` when there is none."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(sql_url)
    except (ArgumentError, ValueError):
        raise NotExact("not a SQLAlchemy URL") from None
    if url.drivername in _SQLITE_DRIVERS:
        return AdbcTarget("sqlite", _sqlite_path(url))
    if url.drivername in _POSTGRES_DRIVERS:
        return AdbcTarget("postgresql", _postgres_conninfo(url))
    raise NotExact(f"no ADBC reader for {url.drivername!r} URLs")


def _sqlite_path(url: Any) -> str:
    database = url.database
    if url.query:
        raise NotExact("a SQLite URL with query parameters")
    if not database or database == ":memory:":
        raise NotExact("an in-memory SQLite database")
    if database.startswith(("file:", "sqlite:")):
        # Both are URIs to ADBC's driver, a file name to Python's sqlite3.
        raise NotExact("a SQLite file name that ADBC would read as a URI")
    if not Path(database).is_file():
        # sqlite3 would create it empty (and fail on the query): left to it.
        raise NotExact("no SQLite file at that path")
    return str(database)


def _postgres_conninfo(url: Any) -> str:
    """The libpq connection string SQLAlchemy's psycopg and psycopg2 dialects build: host,
    port, user, password and database from the URL, then every query parameter."""
    params: dict[str, str] = {}
    for key, value in (
        ("host", url.host),
        ("port", url.port),
        ("user", url.username),
        ("password", url.password),
        ("dbname", url.database),
    ):
        if value:
            params[key] = str(value)
    for key, value in url.query.items():
        if not isinstance(value, str):
            raise NotExact(f"query parameter {key!r} given more than once")
        if key == "host" and (url.host or "," in value or (":" in value and value[:1] != "/")):
            raise NotExact("several PostgreSQL hosts")
        params[key] = value
    return " ".join(f"{key}={_conninfo_quoted(value)}" for key, value in params.items())


def _conninfo_quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_query(query: str, target: AdbcTarget) -> None:
    """``NotExact`` for SQL that SQLAlchemy's ``text()`` or SQLite's DB-API driver would not
    run as ADBC runs it."""
    if _BIND_PARAMETER.search(query) or "\\:" in query:
        raise NotExact("the query holds a ':name' SQLAlchemy reads as a bind parameter")
    if target.driver == "sqlite" and ";" in query.rstrip().removesuffix(";"):
        raise NotExact("a ';' inside the query (sqlite3 refuses a second statement)")


@dataclass
class TextChunk:
    """``rows`` rows of the source; ``columns``, by name, each column asked for that the source
    has: an Arrow string array, or a list of the DB-API driver's Python values for the
    SQLAlchemy reader's text rule."""

    rows: int
    columns: dict[str, pa.Array | list[object]]


def text_chunks(
    target: AdbcTarget, query: str, names: tuple[str, ...], chunk_rows: int
) -> Iterator[TextChunk]:
    """The query's rows in chunks of ``chunk_rows`` (the last one shorter), each checked to be
    what the SQLAlchemy reader would read. Streamed: at most three chunks in memory."""
    check_query(query, target)
    try:
        if target.driver == "sqlite":
            import adbc_driver_sqlite.dbapi as dbapi
        else:
            import adbc_driver_postgresql.dbapi as dbapi  # type: ignore[no-redef]
        from adbc_driver_manager import Error as AdbcError
    except ImportError:
        raise NotExact("the ADBC drivers are not installed") from None

    connection = cursor = None
    try:
        connection = dbapi.connect(target.uri, autocommit=True)
        cursor = connection.cursor()
        if target.driver == "sqlite":
            # Also how many rows SQLite's driver reads to settle each column's type.
            cursor.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": str(chunk_rows)})
        cursor.execute(query)
        reader = cursor.fetch_record_batch()
        check = _sqlite_chunk if target.driver == "sqlite" else _postgres_chunk(reader.schema)
        yield from _read_ahead(check(table, names) for table in _rechunked(reader, chunk_rows))
    except AdbcError as exc:
        raise NotExact(f"the ADBC driver failed ({type(exc).__name__})") from None
    except (pa.ArrowException, OSError) as exc:
        # A type the driver settled on that a later value does not fit comes as an OSError.
        raise NotExact(f"the ADBC reader failed ({type(exc).__name__})") from None
    finally:
        if cursor is not None:
            cursor.close()
        if connection is not None:
            connection.close()


def _read_ahead(items: Generator[TextChunk, None, None]) -> Iterator[TextChunk]:
    """``items``, each read and checked in a thread of its own while the caller handles the one
    before (the driver and Arrow's kernels release the GIL): at most two chunks ahead."""
    ahead: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def hand_over(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                ahead.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not hand_over((True, item)):
                    return
            hand_over((False, None))
        except BaseException as exc:  # raised again by the caller
            hand_over((False, exc))
        finally:
            items.close()

    thread = threading.Thread(target=run, name="adbc-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            more, item = ahead.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _rechunked(reader: pa.RecordBatchReader, rows: int) -> Iterator[pa.Table]:
    """The reader's batches as tables of exactly ``rows`` rows (the last one fewer)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in reader:
        if not batch.num_rows:
            continue
        pending.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(pending, reader.schema)
            yield table.slice(0, rows).combine_chunks()
            pending = table.slice(rows).to_batches()
            count -= rows
    if count:
        yield pa.Table.from_batches(pending, reader.schema).combine_chunks()


def _names(table: pa.Table) -> list[str]:
    names: list[str] = table.column_names
    if len(set(names)) != len(names):
        raise NotExact("the query returns two columns of one name")
    return names


def _sqlite_chunk(table: pa.Table, wanted: tuple[str, ...]) -> TextChunk:
    columns: dict[str, pa.Array | list[object]] = {}
    for name, column in zip(_names(table), table.columns, strict=True):
        values = column.chunk(0) if column.num_chunks else pa.array([], column.type)
        if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
            values = values.cast(pa.string())  # raises unless UTF-8
        elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            values.validate(full=True)  # raises unless UTF-8
        if name not in wanted:
            continue
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            columns[name] = _sqlite_text(values.cast(pa.string()), name)
        elif pa.types.is_integer(values.type):
            columns[name] = _integers(values)
        else:
            raise NotExact(f"column {name!r} is read as {values.type} (a REAL or a BLOB)")
    return TextChunk(table.num_rows, columns)


def _sqlite_text(values: pa.Array, name: str) -> pa.Array:
    """A SQLite column ADBC read as text, unless a value may not have been text."""
    if _may_be_real(values):
        raise NotExact(f"column {name!r} may hold a REAL")
    present = len(values) - values.null_count
    if values.null_count and present:
        digits = pc.sum(pc.match_substring_regex(values, _INTEGER_TEXT)).as_py() or 0
        if digits == present:
            # Integers with NULLs are floats to the SQLAlchemy reader ("7.0"); text is not.
            raise NotExact(f"column {name!r} holds only digits and NULLs")
    return values


def _may_be_real(values: pa.Array) -> bool:
    """Whether a value reads as a REAL would: the pattern, on the values whose first byte may
    begin one (read off Arrow's buffers: most values of an audience begin with a letter)."""
    offsets = np.frombuffer(values.buffers()[1], np.int32, len(values) + 1, 4 * values.offset)
    starts, ends = offsets[:-1], offsets[1:]
    candidate = ends > starts
    if values.null_count:
        candidate &= values.is_valid().to_numpy(zero_copy_only=False)
    if not candidate.any():
        return False
    data = np.frombuffer(values.buffers()[2], np.uint8)
    candidate[candidate] = np.isin(data[starts[candidate]], _REAL_STARTS)
    if not candidate.any():
        return False
    matched = pc.match_substring_regex(values.filter(pa.array(candidate)), _REAL_TEXT)
    return bool(pc.any(matched).as_py())


def _integers(values: pa.Array) -> pa.Array | list[object]:
    """Integers as text when none is NULL (as ``str``), else the values themselves."""
    if values.null_count == 0:
        return values.cast(pa.string())
    return values.to_pylist()


def _postgres_chunk(schema: pa.Schema) -> Any:
    types = {field.name: _pg_type(field) for field in schema}

    def check(table: pa.Table, wanted: tuple[str, ...]) -> TextChunk:
        columns: dict[str, pa.Array | list[object]] = {}
        for name, column in zip(_names(table), table.columns, strict=True):
            kind = types.get(name, "")
            values = column.chunk(0) if column.num_chunks else pa.array([], column.type)
            if name not in wanted:
                if kind not in _PG_UNREAD:
                    raise NotExact(f"an unread column {name!r} of PostgreSQL type {kind!r}")
            elif kind in _PG_TEXT:
                values.validate(full=True)  # raises unless UTF-8
                columns[name] = values.cast(pa.string())
            elif kind in _PG_INTEGER:
                columns[name] = _integers(values)
            elif kind in _PG_VALUES:
                columns[name] = values.to_pylist()
            else:
                raise NotExact(f"column {name!r} is of PostgreSQL type {kind!r}")
        return TextChunk(table.num_rows, columns)

    return check


def _pg_type(field: pa.Field) -> str:
    metadata = field.metadata or {}
    # The driver's key since 1.13; the older one for a driver that does not set it.
    name = metadata.get(b"POSTGRESQL:type") or metadata.get(b"ADBC:postgresql:typname") or b""
    return bytes(name).decode("utf-8", "replace")
