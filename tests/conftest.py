"""Every test belongs to exactly one tier; collection fails for a test without one."""

from __future__ import annotations

import pytest

TIERS = {"unit", "dag", "integration", "e2e", "distributed"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = [item.nodeid for item in items if not TIERS & {m.name for m in item.iter_markers()}]
    if unmarked:
        raise pytest.UsageError(
            f"tests without a tier marker ({', '.join(sorted(TIERS))}): " + ", ".join(unmarked[:10])
        )
