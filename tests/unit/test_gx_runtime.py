"""The GX runtime: what Mailroom asks of Great Expectations beyond its defaults."""

from __future__ import annotations

import pandas as pd
import pytest

from mailroom.gx_runtime import Suite, validate_frame, validate_suites

pytestmark = pytest.mark.unit


def _markers(result: object) -> dict[str, object]:
    return dict(result.meta["batch_markers"])  # type: ignore[attr-defined]


def test_batches_are_not_fingerprinted() -> None:
    """GX would hash every value of every frame (seconds per million rows) only to label the
    batch in its result; Mailroom's frames live for one check, so no fingerprint is made."""
    import great_expectations.expectations as gxe

    frame = pd.DataFrame({"email": ["a@example.com", "b@example.com"], "n": [1, 2]})
    expectation = gxe.ExpectColumnValuesToNotBeNull(column="email")

    single = validate_frame(frame, suite_name="one", expectations=[expectation])
    (suite,) = validate_suites([Suite("two", frame, [expectation])])

    for result in (single, suite):
        assert result.success
        assert "ge_load_time" in _markers(result)  # the markers are there, the fingerprint not
        assert "pandas_data_fingerprint" not in _markers(result)
