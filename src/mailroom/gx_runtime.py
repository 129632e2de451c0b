"""Great Expectations 1.x, called from our own code: one quiet ephemeral context per check.

GX is imported inside the functions: it costs seconds to import and only two stages need it.
``validate_suites`` (the gate) and ``validate_chunks`` (the audience) validate a suite a chunk
of rows at a time and merge the chunks' results into one, so no stage holds a whole audience
in one frame; either can leave GX's Data Docs of the merged results (counts only) in a folder
(``write_data_docs``), and ``validate_chunks`` hands each chunk's result (which can name the
failing rows) to the caller.
``validate_frame`` validates one frame with any expectation.

A chunk is judged alone, so only expectations whose verdict on a row depends on that row alone
(``ROW_LOCAL``) are chunked, and the table's row count (``ON_TOTALS``) is judged once, on the
total; anything else (uniqueness, a column's mean…) would be judged per chunk and is refused:
a run-wide property is the caller's to compute into a column of each row
(``run_keys.RunKeys``) and check there.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

# Counts, never values: an unexpected value in Mailroom's checks is a recipient's address, and
# GX would list them in its results and its Data Docs.
COUNTS_ONLY: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": 0}
DATA_DOCS_SITE = "run"


# Expectations whose verdict on a row depends on that row alone: a chunk's verdict on its rows
# is the whole table's.
ROW_LOCAL = frozenset(
    {
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_null",
        "expect_column_values_to_match_regex",
        "expect_column_values_to_not_match_regex",
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_not_be_in_set",
        "expect_column_values_to_be_between",
        "expect_column_value_lengths_to_be_between",
    }
)
# Judged once, on the number of rows every chunk held.
ON_TOTALS = frozenset({"expect_table_row_count_to_equal", "expect_table_row_count_to_be_between"})


@dataclass(frozen=True)
class Suite:
    """The rows (one or more chunks of them) and the expectations they must meet, validated as
    one GX suite of that name."""

    name: str
    chunks: Iterable[pd.DataFrame]
    expectations: Sequence[Any]


def validate_suites(suites: Sequence[Suite], *, data_docs_dir: Path | None = None) -> list[Any]:
    """Validate each suite's chunks against its expectations (``COUNTS_ONLY`` results) in one
    ephemeral context; returns GX's ExpectationSuiteValidationResults, each chunk's merged into
    one per suite (``validate_chunks``). A suite's chunks are read only once the suites before
    it are validated.

    With ``data_docs_dir``, GX then builds its own Data Docs site for every merged result there
    (``index.html`` and one page per suite and per validation), replacing what was there: the
    docs are written whether the suites pass or not.
    """
    context = _context()
    results = [
        validate_chunks(
            suite.chunks,
            suite_name=suite.name,
            expectations=suite.expectations,
            context=context,
        )
        for suite in suites
    ]
    if data_docs_dir is not None:
        write_data_docs(context, results, data_docs_dir)
    return results


def write_data_docs(context: Any, results: Sequence[Any], data_docs_dir: Path) -> None:
    """GX's own Data Docs site for ``results`` (merged, counts-only results) in
    ``data_docs_dir``: ``index.html`` and one page per suite and per validation, built in a
    ``.building`` folder next to it that then replaces whatever ``data_docs_dir`` held."""
    building = data_docs_dir.with_name(data_docs_dir.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    context.add_data_docs_site(
        DATA_DOCS_SITE,
        {
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(building.resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    for result in results:
        _store(context, result)
    # Every stored result at once (one index build rather than one per checkpoint).
    context.build_data_docs(site_names=[DATA_DOCS_SITE])
    shutil.rmtree(data_docs_dir, ignore_errors=True)
    building.replace(data_docs_dir)


def _context() -> Any:
    """A quiet ephemeral GX context: no analytics, no progress bars, warnings only."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # GX fingerprints every in-memory batch under HASH_THRESHOLD bytes (pandas' hash of every
    # value, then MD5) only to label it in the result's batch markers: seconds per million rows,
    # for a label nobody reads (a frame here lives for one check). No batch is under 0 bytes.
    from great_expectations.execution_engine import pandas_execution_engine

    pandas_execution_engine.HASH_THRESHOLD = 0
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def validate_chunks(
    chunks: Iterable[pd.DataFrame],
    *,
    suite_name: str,
    expectations: Sequence[Any],
    index_columns: Sequence[str] = (),
    each: Callable[[pd.DataFrame, Any], None] | None = None,
    context: Any = None,
    data_docs_dir: Path | None = None,
) -> Any:
    """Validate every chunk of rows against the ``ROW_LOCAL`` expectations, then the total
    row count against the ``ON_TOTALS`` ones; returns one ExpectationSuiteValidationResult, the
    expectations in the order given, each chunk's counts summed (``_merged``). Any other
    expectation is refused (ValueError), as is a ``mostly`` below 1 and an empty ``chunks``
    (pass one empty frame with the columns for no rows), unless ``chunks`` is a sequence of
    one frame: the whole table, which any expectation may judge.

    ``each(chunk, result)`` is called with every chunk's own result; with ``index_columns``
    those results name the failing rows of the chunk by those columns (``COMPLETE``), which
    the merged result leaves out: it holds counts only, whatever the run's size.

    With ``data_docs_dir``, GX's Data Docs of the merged result (and of nothing else) are
    written there (``write_data_docs``) before this returns, whether the suite passes or not.
    """
    import great_expectations as gx
    import pandas as pd

    whole = isinstance(chunks, Sequence) and len(chunks) == 1
    per_row, on_totals = (list(expectations), []) if whole else _split(expectations)
    context = context if context is not None else _context()
    batches = (
        context.data_sources.add_pandas(suite_name)
        .add_dataframe_asset(suite_name)
        .add_batch_definition_whole_dataframe("all")
    )
    suite = gx.ExpectationSuite(name=suite_name)
    for expectation in per_row:
        suite.add_expectation(expectation)
    result_format: dict[str, Any] = dict(COUNTS_ONLY)
    if index_columns:
        result_format = {
            "result_format": "COMPLETE",
            "unexpected_index_column_names": list(index_columns),
            "return_unexpected_index_query": False,
        }
    parts: list[Any] = []
    rows = 0
    for chunk in chunks:
        result = batches.get_batch(batch_parameters={"dataframe": chunk}).validate(
            suite, result_format=result_format
        )
        if each is not None:
            each(chunk, result)
        parts.append(_counts_only(result))
        rows += len(chunk)
    if not parts:
        raise ValueError(f"suite {suite_name}: no chunk of rows to validate")
    totals = None
    if on_totals:
        total_suite = gx.ExpectationSuite(name=suite_name)
        for expectation in on_totals:
            total_suite.add_expectation(expectation)
        # As many rows as every chunk held together, and no column: all a row count reads.
        totals = batches.get_batch(
            batch_parameters={"dataframe": pd.DataFrame(index=pd.RangeIndex(rows))}
        ).validate(total_suite, result_format=dict(COUNTS_ONLY))
    merged = _merged(suite_name, list(expectations), parts, totals)
    if data_docs_dir is not None:
        write_data_docs(context, [merged], data_docs_dir)
    return merged


def _split(expectations: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    per_row, on_totals = [], []
    for expectation in expectations:
        kind = expectation.expectation_type
        if kind in ON_TOTALS:
            on_totals.append(expectation)
        elif kind in ROW_LOCAL:
            if (getattr(expectation, "mostly", None) or 1.0) < 1.0:
                raise ValueError(f"{kind}: only mostly=1 is judged chunk by chunk")
            per_row.append(expectation)
        else:
            raise ValueError(
                f"{kind} does not judge each row alone: it cannot be validated chunk by chunk "
                "(compute the run-wide property into a column and check that column)"
            )
    return per_row, on_totals


# What a column-map result counts; the merged result sums them and recomputes its percentages.
_COUNTS = ("element_count", "missing_count", "unexpected_count")


def _counts_only(result: Any) -> Any:
    """A copy of a chunk's result without its lists (the failing rows it names, the values):
    what ``_merged`` keeps of every chunk, so their memory does not grow with the run."""
    import copy

    kept = copy.copy(result)
    kept.results = []
    for item in result.results:
        counts = copy.copy(item)
        counts.result = {
            k: v for k, v in item.result.items() if not isinstance(v, list | tuple | dict)
        }
        kept.results.append(counts)
    return kept


def _merged(suite_name: str, expectations: list[Any], parts: list[Any], totals: Any) -> Any:
    """One suite result from every chunk's and the totals' results: per expectation (by its
    id, in the order given), the counts summed, the percentages recomputed from them, success
    when every chunk's was, an exception in any chunk kept."""
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResult,
        ExpectationValidationResult,
    )

    by_config: dict[str, list[Any]] = {}
    for part in [*parts, *([totals] if totals is not None else [])]:
        for item in part.results:
            by_config.setdefault(_identity(item.expectation_config), []).append(item)
    results = []
    for expectation in expectations:
        items = by_config[_identity(expectation.configuration)]
        first = items[0]
        raised = next((i for i in items if i.exception_info.get("raised_exception")), None)
        result = dict(first.result)
        if len(items) > 1:
            for key in _COUNTS:
                if key in result:
                    result[key] = sum(int(i.result.get(key) or 0) for i in items)
            result |= _percentages(result)
        results.append(
            ExpectationValidationResult(
                success=raised is None and all(bool(i.success) for i in items),
                expectation_config=first.expectation_config,
                result=result,
                meta=first.meta,
                exception_info=(raised or first).exception_info,
            )
        )
    successful = sum(1 for r in results if r.success)
    statistics = {
        "evaluated_expectations": len(results),
        "successful_expectations": successful,
        "unsuccessful_expectations": len(results) - successful,
        "success_percent": 100.0 * successful / len(results) if results else None,
    }
    return ExpectationSuiteValidationResult(
        success=successful == len(results),
        results=results,
        suite_name=suite_name,
        statistics=statistics,
        meta={**parts[0].meta, "chunks": len(parts)},
        batch_id=parts[0].batch_id,
    )


def _identity(config: Any) -> str:
    """An expectation as its result names it: its type and arguments (GX adds the batch's)."""
    import json

    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    return f"{config.type}{json.dumps(kwargs, sort_keys=True, default=str)}"


def _percentages(result: dict[str, Any]) -> dict[str, Any]:
    elements = int(result.get("element_count") or 0)
    missing = int(result.get("missing_count") or 0)
    unexpected = int(result.get("unexpected_count") or 0)
    present = elements - missing
    out: dict[str, Any] = {}
    if "missing_percent" in result:
        out["missing_percent"] = 100.0 * missing / elements if elements else None
    if "unexpected_percent_total" in result:
        out["unexpected_percent_total"] = 100.0 * unexpected / elements if elements else None
    if "unexpected_percent_nonmissing" in result:
        out["unexpected_percent_nonmissing"] = 100.0 * unexpected / present if present else None
    if "unexpected_percent" in result:
        base = present if "missing_count" in result else elements
        out["unexpected_percent"] = 100.0 * unexpected / base if base else None
    return out


def _store(context: Any, result: Any) -> None:
    """Keep a merged result in the context's validation results store, where GX's Data Docs
    are built from."""
    import datetime

    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    run_id = RunIdentifier(run_time=datetime.datetime.now(datetime.UTC))
    result.meta["run_id"] = run_id
    result.meta["validation_time"] = run_id.run_time
    suite_id = ExpectationSuiteIdentifier(name=result.suite_name)
    context.validation_results_store.store_validation_results(
        suite_validation_result=result,
        suite_validation_result_identifier=ValidationResultIdentifier(
            batch_identifier=result.batch_id or result.suite_name,
            expectation_suite_identifier=suite_id,
            run_id=run_id,
        ),
        expectation_suite_identifier=suite_id,
    )


def validate_frame(
    frame: pd.DataFrame,
    *,
    suite_name: str,
    expectations: Sequence[Any],
    index_columns: Sequence[str] = (),
) -> Any:
    """Validate ``frame``, the whole table, against ``expectations`` (any of them); returns GX's
    ExpectationSuiteValidationResult for it. With ``index_columns`` the result names the
    failing rows by those columns."""
    results: list[Any] = []
    validate_chunks(
        [frame],
        suite_name=suite_name,
        expectations=expectations,
        index_columns=index_columns,
        each=lambda _, result: results.append(result),
    )
    return results[0]


def summarise(result: Any) -> dict[str, Any]:
    """Counts only: a GX result names unexpected values, which here are addresses."""
    checks = []
    for item in result.results:
        config = item.expectation_config
        kwargs = {
            k: v for k, v in config.kwargs.items() if k in {"column", "min_value", "max_value"}
        }
        checks.append(
            {
                "expectation": config.type,
                **kwargs,
                "success": bool(item.success),
                "element_count": item.result.get("element_count"),
                "unexpected_count": item.result.get("unexpected_count"),
                "observed_value": _plain(item.result.get("observed_value")),
            }
        )
    stats = result.statistics
    return {
        "suite": result.suite_name,
        "success": bool(result.success),
        "evaluated": stats.get("evaluated_expectations"),
        "successful": stats.get("successful_expectations"),
        "checks": checks,
    }


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
