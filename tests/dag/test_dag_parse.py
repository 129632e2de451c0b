"""What Airflow pays to parse the DAG, and what it loads from plugins/.

The scheduler and the dag-processor parse the DAG file again and again: it may import Airflow
and the light adapter entry points, never the domain package's heavy dependencies. Each check
runs in a fresh interpreter, since this test process has imported everything already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.dag
REPO = Path(__file__).resolve().parents[2]

HEAVY = ("pandas", "pyarrow", "great_expectations", "babel", "sendgrid", "mailroom.pipeline")


def _in_fresh_python(code: str) -> dict[str, object]:
    """Run ``code`` (which prints one JSON line last) in a new interpreter with this Airflow."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _parse(dag_folder: Path) -> dict[str, object]:
    return _in_fresh_python(
        f"""
        import json, sys
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder={str(dag_folder)!r})
        print(json.dumps({{
            "errors": {{k: str(v) for k, v in bag.import_errors.items()}},
            "dags": sorted(bag.dag_ids),
            "tasks": len(bag.dags["mailroom_campaign"].tasks) if bag.dags else 0,
            "loaded": [m for m in {HEAVY!r} if m in sys.modules],
        }}))
        """
    )


def test_parsing_the_dag_imports_none_of_the_heavy_libraries() -> None:
    result = _parse(REPO / "dags")
    assert result["errors"] == {}
    assert result["dags"] == ["mailroom_campaign"]
    assert result["tasks"] == 14
    assert result["loaded"] == []


def test_the_parse_check_catches_a_dag_file_that_imports_the_pipeline(tmp_path: Path) -> None:
    source = (REPO / "dags" / "mailroom_campaign.py").read_text("utf-8")
    heavy = source.replace(
        "from mailroom_airflow import tasks\n",
        "from mailroom import pipeline  # noqa: F401\nfrom mailroom_airflow import tasks\n",
    )
    assert heavy != source
    (tmp_path / "mailroom_campaign.py").write_text(heavy, "utf-8")
    result = _parse(tmp_path)
    assert result["errors"] == {}
    assert {"mailroom.pipeline", "pandas", "pyarrow", "babel"} <= set(result["loaded"])  # type: ignore[arg-type]


def test_plugins_folder_holds_one_airflow_plugin_and_nothing_else() -> None:
    """Airflow imports every module of plugins/ under its file name: only the plugin is there,
    and loading it imports no adapter module a second time under a bare name."""
    modules = sorted(p.name for p in (REPO / "plugins").iterdir() if p.name != "__pycache__")
    assert modules == ["mailroom_plugin.py"]
    result = _in_fresh_python(
        """
        import json, sys
        from airflow import plugins_manager

        plugins = plugins_manager.get_plugin_info()
        print(json.dumps({
            "plugins": [p["name"] for p in plugins],
            "sources": [str(p.get("source")) for p in plugins],
            "bare": [m for m in ("settings", "tasks", "approval", "stages") if m in sys.modules],
        }))
        """
    )
    assert result["plugins"] == ["mailroom"]
    assert "mailroom_plugin.py" in str(result["sources"])
    assert result["bare"] == []


def test_each_task_has_one_name_at_every_layer() -> None:
    """A task, its body in ``mailroom_airflow.tasks`` and its ``mailroom.pipeline`` function
    share one name (``approve`` is an operator; ``plan_shards`` only reads XCom)."""
    from airflow.dag_processing.dagbag import DagBag

    from mailroom import pipeline
    from mailroom_airflow import tasks

    dag = DagBag(dag_folder=str(REPO / "dags")).dags["mailroom_campaign"]
    task_ids = set(dag.task_ids) - {"approve", "plan_shards"}
    assert len(task_ids) == 12
    assert {t for t in task_ids if not callable(getattr(tasks, t, None))} == set()
    assert {t for t in task_ids if not callable(getattr(pipeline, t, None))} == set()
    assert set(pipeline.__all__) - {"ProjectPaths", "Run"} == task_ids
