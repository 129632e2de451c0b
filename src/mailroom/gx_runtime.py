"""Great Expectations 1.x, called from our own code: one quiet ephemeral context per check.

GX is imported inside the functions: it costs seconds to import and only two stages need it.
``validate_suites`` (the gate) runs Checkpoints and can leave GX's Data Docs in a folder;
``validate_frame`` (the audience) validates one batch and can name the failing rows.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

# Counts, never values: an unexpected value in Mailroom's checks is a recipient's address, and
# GX would list them in its results and its Data Docs.
COUNTS_ONLY: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": 0}
DATA_DOCS_SITE = "run"


@dataclass(frozen=True)
class Suite:
    """One frame and the expectations it must meet, validated as one GX suite of that name."""

    name: str
    frame: pd.DataFrame
    expectations: Sequence[Any]


def validate_suites(suites: Sequence[Suite], *, data_docs_dir: Path | None = None) -> list[Any]:
    """Validate each frame against its suite; returns GX's ExpectationSuiteValidationResults.

    Each suite runs through a GX Checkpoint (``COUNTS_ONLY`` results) in one ephemeral context.
    With ``data_docs_dir``, GX then builds its own Data Docs site for every result there
    (``index.html`` and one page per suite and per validation), replacing what was there: the
    docs are written whether the suites pass or not.
    """
    import great_expectations as gx

    context = _context()
    building = None
    if data_docs_dir is not None:
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
    results = []
    for suite in suites:
        batch_definition = (
            context.data_sources.add_pandas(suite.name)
            .add_dataframe_asset(suite.name)
            .add_batch_definition_whole_dataframe("all")
        )
        gx_suite = context.suites.add(gx.ExpectationSuite(name=suite.name))
        for expectation in suite.expectations:
            gx_suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite.name, data=batch_definition, suite=gx_suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=suite.name,
                validation_definitions=[definition],
                result_format=dict(COUNTS_ONLY),
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": suite.frame})
        results.extend(outcome.run_results.values())
    if data_docs_dir is not None and building is not None:
        # Every stored result at once (one index build rather than one per checkpoint).
        context.build_data_docs(site_names=[DATA_DOCS_SITE])
        shutil.rmtree(data_docs_dir, ignore_errors=True)
        building.replace(data_docs_dir)
    return results


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


def validate_frame(
    frame: pd.DataFrame,
    *,
    suite_name: str,
    expectations: Sequence[Any],
    index_columns: Sequence[str] = (),
) -> Any:
    """Validate ``frame`` against ``expectations``; returns GX's ExpectationSuiteValidationResult.

    With ``index_columns`` the result names the failing rows by those columns, so callers can
    quarantine exactly what GX found rather than re-implementing each rule.
    """
    context = _context()
    import great_expectations as gx

    asset = context.data_sources.add_pandas(suite_name).add_dataframe_asset(suite_name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
        batch_parameters={"dataframe": frame}
    )
    suite = gx.ExpectationSuite(name=suite_name)
    for expectation in expectations:
        suite.add_expectation(expectation)
    result_format: dict[str, Any] = dict(COUNTS_ONLY)
    if index_columns:
        result_format = {
            "result_format": "COMPLETE",
            "unexpected_index_column_names": list(index_columns),
            "return_unexpected_index_query": False,
        }
    return batch.validate(suite, result_format=result_format)


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
