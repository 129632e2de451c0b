"""Great Expectations 1.x, called from our own code: one quiet ephemeral context per check.

GX is imported inside the functions: it costs seconds to import and only two stages need it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


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
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas(suite_name).add_dataframe_asset(suite_name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
        batch_parameters={"dataframe": frame}
    )
    suite = gx.ExpectationSuite(name=suite_name)
    for expectation in expectations:
        suite.add_expectation(expectation)
    result_format: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": 0}
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
