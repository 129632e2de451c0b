"""Markers a test must carry for the services its fixtures need.

``postgres``: the PostgreSQL server at 127.0.0.1:5432. Any test that reaches a fixture in
``POSTGRES_FIXTURES`` must carry it (so ``-m "not postgres"`` leaves out exactly the tests that
need the server): tests/conftest.py refuses at collection a test that requests one directly,
and the fixtures fail a test that reaches them another way (``request.getfixturevalue``, a
parametrized fixture) with ``require_marker``. A parametrized case marks only its own param:
``pytest.param("postgresql", marks=pytest.mark.postgres)``.
"""

from __future__ import annotations

import pytest

POSTGRES = "postgres"
POSTGRES_FIXTURES = frozenset(
    {"postgres_url", "postgres_database", "fresh_databases", "local_services"}
)


def require_marker(request: pytest.FixtureRequest, marker: str) -> None:
    """Fail the requesting test unless it carries ``marker``; call from a function-scoped fixture
    (a wider fixture's ``request.node`` is not the test)."""
    node = request.node
    if not isinstance(node, pytest.Item):
        raise TypeError(f"require_marker needs a function-scoped fixture, not {node!r}")
    if node.get_closest_marker(marker) is None:
        pytest.fail(
            f"{node.nodeid} uses the fixture {request.fixturename!r}, which needs "
            f"@pytest.mark.{marker}: mark the test (or its param: "
            f"pytest.param(..., marks=pytest.mark.{marker}))",
            pytrace=False,
        )
