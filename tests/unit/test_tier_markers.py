"""The checks of tests/conftest.py, run on throwaway test files: one tier per test, and the
``postgres`` marker on every test that reaches a PostgreSQL fixture."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parents[1]
PYPROJECT = TESTS.parent / "pyproject.toml"


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A directory with this project's conftest.py and markers (strict, as in pyproject)."""
    # No plugin is needed in there, and loading them (hypothesis, ...) takes a second a run.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    markers = tomllib.loads(PYPROJECT.read_text("utf-8"))["tool"]["pytest"]["ini_options"][
        "markers"
    ]
    pytester.makeini(
        "[pytest]\naddopts = --strict-markers -p no:cacheprovider\nmarkers =\n"
        + "".join(f"    {m}\n" for m in markers)
    )
    pytester.makeconftest((TESTS / "conftest.py").read_text("utf-8"))
    return pytester


def test_a_test_with_one_tier_runs(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_one="""
        import pytest

        pytestmark = pytest.mark.unit

        @pytest.mark.unit  # the same tier again: still one tier
        def test_ok():
            pass

        @pytest.mark.dag
        class TestDag:
            def test_ok(self):
                pass
        """
    )
    # The module's unit and the class's dag make TestDag::test_ok two-tiered: only test_ok runs.
    result = project.runpytest("test_one.py::test_ok")
    result.assert_outcomes(passed=1)


def test_a_test_without_a_tier_fails_collection(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_none="""
        def test_untiered():
            pass
        """
    )
    result = project.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*tests without a tier marker*test_none.py::test_untiered*"])


@pytest.mark.parametrize(
    ("source", "named"),
    [
        (
            """
            import pytest

            pytestmark = pytest.mark.unit

            @pytest.mark.integration
            def test_two():
                pass
            """,
            "test_two (integration, unit)",
        ),
        (
            """
            import pytest

            pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

            def test_two():
                pass
            """,
            "test_two (distributed, e2e)",
        ),
        (
            """
            import pytest

            @pytest.mark.dag
            class TestTwo:
                @pytest.mark.unit
                def test_two(self):
                    pass
            """,
            "TestTwo::test_two (dag, unit)",
        ),
    ],
    ids=["module and function", "two in pytestmark", "class and method"],
)
def test_a_test_with_two_tiers_fails_collection_naming_them(
    project: pytest.Pytester, source: str, named: str
) -> None:
    project.makepyfile(test_two=source)
    result = project.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*more than one tier marker*test_two.py::{named}*"])


POSTGRES_CASES = """
import pytest

from support.markers import POSTGRES, require_marker

pytestmark = pytest.mark.unit


@pytest.fixture
def postgres_url(request):
    require_marker(request, POSTGRES)
    return "postgresql://"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request):
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return "sqlite://"


@pytest.fixture(params=["sqlite", "postgresql"])
def unmarked_database(request):
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return "sqlite://"


@pytest.mark.postgres
def test_marked(postgres_url):
    pass


def test_marked_param(database):
    pass


def test_unmarked_param(unmarked_database):
    pass
"""


def test_a_postgres_fixture_reached_without_the_marker_fails_the_test(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(test_pg=POSTGRES_CASES)
    result = project.runpytest("-rE")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(
        [
            "test_pg.py::test_unmarked_param[[]postgresql[]] "
            "uses the fixture 'postgres_url', which needs @pytest.mark.postgres*",
            "ERROR test_pg.py::test_unmarked_param[[]postgresql[]] - *",
        ]
    )
    # -m "not postgres" leaves out exactly the marked cases: the sqlite ones still run.
    result = project.runpytest("-v", "-m", "not postgres", "-k", "not unmarked")
    result.assert_outcomes(passed=1, deselected=4)
    result.stdout.fnmatch_lines(["test_pg.py::test_marked_param[[]sqlite[]] PASSED*"])


def test_a_test_requesting_a_postgres_fixture_without_the_marker_fails_collection(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(
        test_pg="""
        import pytest

        pytestmark = pytest.mark.unit

        @pytest.fixture
        def postgres_url():
            return "postgresql://"

        def test_forgot(postgres_url):
            pass
        """
    )
    result = project.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*without @pytest.mark.postgres: test_pg.py::test_forgot (postgres_url)*"]
    )
