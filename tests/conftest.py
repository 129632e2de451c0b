"""Every test belongs to exactly one tier; collection fails for a test with none or with several.

``postgres`` is not a tier: it marks the tests that need the PostgreSQL server at 127.0.0.1:5432
(``-m "not postgres"`` leaves them out). Collection also fails for a test that requests a
PostgreSQL fixture without it, and the fixtures fail a test that reaches them another way
(see ``support.markers``).
"""

from __future__ import annotations

import pytest

from support.markers import POSTGRES, POSTGRES_FIXTURES

TIERS = {"unit", "dag", "integration", "e2e", "distributed"}
SHOWN = 10  # offenders named in the error, per kind


def tiers_of(item: pytest.Item) -> list[str]:
    """The distinct tier markers of a test (its module's, its class's and its own), sorted."""
    return sorted(TIERS & {m.name for m in item.iter_markers()})


def _some(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked: list[str] = []
    several: list[str] = []
    unmarked_postgres: list[str] = []
    for item in items:
        tiers = tiers_of(item)
        if not tiers:
            unmarked.append(item.nodeid)
        elif len(tiers) > 1:
            several.append(f"{item.nodeid} ({', '.join(tiers)})")
        needs = POSTGRES_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if needs and item.get_closest_marker(POSTGRES) is None:
            unmarked_postgres.append(f"{item.nodeid} ({', '.join(sorted(needs))})")
    problems = []
    if unmarked:
        problems.append(
            f"tests without a tier marker ({', '.join(sorted(TIERS))}): {_some(unmarked)}"
        )
    if several:
        problems.append(f"tests with more than one tier marker (one each): {_some(several)}")
    if unmarked_postgres:
        problems.append(
            f"tests using a PostgreSQL fixture without @pytest.mark.{POSTGRES}: "
            + _some(unmarked_postgres)
        )
    if problems:
        raise pytest.UsageError("; ".join(problems))
