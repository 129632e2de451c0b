"""Run folders on object storage, against a real S3-compatible server (moto's server mode).

Every stage runs in a working copy of its own, as each Airflow task does on whichever worker it
lands: what one stage wrote must come back, from the server, to the next.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mailroom import pipeline
from mailroom.approval.summary import approval_summary
from mailroom.audience.sample import SampleAudience, generate
from mailroom.batches import load_manifest
from mailroom.delivery.outbox import Outbox
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.pipeline import ProjectPaths, Run
from mailroom.staging import read_json, run_location, write_json
from mailroom.staging_store import (
    FROZEN,
    MANIFEST,
    RECORD,
    SNAPSHOT,
    SPEC,
    STAGES,
    SUPPRESSED,
    RunStore,
    StagingError,
)
from sendgrid_dev import SendGridDevServer, accepted_recipients
from support.s3_server import SECRET, S3Server, threaded_s3_server

pytestmark = pytest.mark.unit
UNSUBSCRIBE_SECRET = b"staging-store-secret"
REPO = Path(__file__).resolve().parents[2]
SHARDS = 3


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with threaded_s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def audience(tmp_path_factory: pytest.TempPathFactory) -> SampleAudience:
    return generate(tmp_path_factory.mktemp("users") / "users.sqlite", users=2500)


@contextmanager
def in_stage(
    s3: S3Server,
    xcom: dict[str, Any],
    stage: str,
    *,
    shard: tuple[int, int] | None = None,
    store: RunStore | None = None,
) -> Iterator[Run]:
    """A stage's working copy, the way the Airflow adapter opens one for each task."""
    store = store or RunStore(xcom["run_dir"], **_opts(s3))
    with store.working_copy(stage, shard=shard) as folder:
        yield Run.from_xcom(xcom, working_dir=folder)


def prepare(s3: S3Server, prefix: str, shards: int = SHARDS) -> dict[str, Any]:
    root = s3.url(prefix)
    store = RunStore(run_location(root, "winter_update", "manual__s3"), **_opts(s3))
    with store.working_copy("prepare") as folder:
        run = pipeline.prepare(
            ProjectPaths.under(REPO / "include"),
            campaign="winter_update",
            run_id="manual__s3",
            staging_root=root,
            shard_count=shards,
            dry_run=False,
            working_dir=folder,
        )
    return run.to_xcom()


def _opts(s3: S3Server) -> dict[str, Any]:
    return {"storage_options": s3.storage_options}


@pytest.fixture(scope="module")
def frozen(
    s3: S3Server, audience: SampleAudience, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A run on the server up to its frozen batches: (prepared, frozen, outbox URL)."""
    xcom = prepare(s3, "frozen")
    outbox_url = f"sqlite:///{tmp_path_factory.mktemp('outbox') / 'outbox.sqlite'}"
    paths = ProjectPaths.under(REPO / "include")
    with in_stage(s3, xcom, "extract_audience") as run:
        pipeline.extract_audience(run, sql_url=audience.url())
    with in_stage(s3, xcom, "validate_audience") as run:
        pipeline.validate_audience(run)
    with in_stage(s3, xcom, "render_content") as run:
        pipeline.render_content(run, paths)
    with in_stage(s3, xcom, "build_envelopes") as run:
        pipeline.build_envelopes(run, secret=UNSUBSCRIBE_SECRET)
    outbox = Outbox(outbox_url)
    try:
        store = RunStore(xcom["run_dir"], **_opts(s3))
        with in_stage(s3, xcom, "freeze_batches", store=store) as run:
            result = pipeline.freeze_batches(run, outbox=outbox)
        # The manifest goes up after every request body it names, and the freeze's marker
        # (``run_record``) after the manifest.
        assert list(store.last.uploaded)[-2:] == [MANIFEST, FROZEN]
    finally:
        outbox.dispose()
    return xcom, result, outbox_url


def test_a_whole_run_goes_through_the_object_store(
    s3: S3Server,
    frozen: tuple[dict[str, Any], dict[str, Any], str],
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    xcom, result, outbox_url = frozen
    assert xcom["run_dir"] == s3.url("frozen/winter_update/manual__s3")
    outbox = Outbox(outbox_url)
    try:
        with in_stage(s3, xcom, "check_envelopes") as run:
            gate = pipeline.check_envelopes(
                run, ProjectPaths.under(REPO / "include"), secret=UNSUBSCRIBE_SECRET, outbox=outbox
            )
    finally:
        outbox.dispose()
    assert gate["success"] is True
    with in_stage(s3, xcom, "summarise") as run:
        summary = approval_summary(run, triggered_by="analyst")
    assert summary["staging"] == xcom["run_dir"]
    assert summary["quality"]["data_docs"] == f"{xcom['run_dir']}/gate/data_docs/index.html"
    with in_stage(s3, xcom, "approve") as run:
        write_json(run.staging.approval, {"decision": "approved", "by": "approver"})
    outbox = Outbox(outbox_url)
    try:
        count = len(result["shards"])
        for shard in result["shards"]:
            with in_stage(s3, xcom, "guard_shard", shard=(shard, count)) as run:
                pipeline.guard_shard(
                    run,
                    manifest_sha256=result["manifest_sha256"],
                    outbox=outbox,
                    shard=shard,
                    shard_count=count,
                )
        for shard in result["shards"]:
            with in_stage(s3, xcom, "send_shard", shard=(shard, count)) as run:
                pipeline.send_shard(
                    run,
                    shard=shard,
                    manifest_sha256=result["manifest_sha256"],
                    transport=SendGridTransport(
                        SendGridSettings("SG.test", dev_server.url, timeout_seconds=10)
                    ),
                    outbox=outbox,
                    shard_count=len(result["shards"]),
                )
        with in_stage(s3, xcom, "reconcile") as run:
            approval = read_json(run.staging.approval)
            report = pipeline.reconcile(run, outbox=outbox, approval=approval)
    finally:
        outbox.dispose()

    assert report["status"] == "sent", report
    assert report["balanced"] is True
    assert report["not_sent_file"] == f"{xcom['run_dir']}/not_sent.csv"
    received = Counter(e.lower() for e in accepted_recipients(dev_server.accepted()))
    assert set(received) == audience.expected
    assert max(received.values()) == 1

    objects = s3.keys("frozen/winter_update/manual__s3")
    manifest = load_manifest_from(s3, xcom)
    expected = {
        SPEC,
        MANIFEST,
        "audience/snapshot.parquet",
        "audience/valid.parquet",
        "audience/validation.json",
        "envelopes.parquet",
        "gate/result.json",
        "gate/data_docs/index.html",
        "approval.json",
        "report.json",
        "not_sent.csv",
        *(f"batches/{b.file}" for b in manifest.batches),
        *(f"preview/{loc}.html" for loc in manifest.per_locale()),
    }
    assert expected <= set(objects), expected - set(objects)
    # Whole objects: each request body has exactly the size the manifest recorded.
    for b in manifest.batches:
        assert objects[f"batches/{b.file}"] == b.size


def load_manifest_from(s3: S3Server, xcom: dict[str, Any]) -> Any:
    store = RunStore(xcom["run_dir"], **_opts(s3))
    with store.working_copy("send_shard", shard=(0, 1)) as folder:
        return load_manifest(folder / MANIFEST)


def test_a_send_shard_fetches_only_the_manifest_its_inputs_and_its_own_batch_bodies(
    s3: S3Server, frozen: tuple[dict[str, Any], dict[str, Any], str]
) -> None:
    xcom, _, _ = frozen
    manifest = load_manifest_from(s3, xcom)
    assert len(manifest.batches) > SHARDS  # so a shard owns only some of them
    for shard in range(SHARDS):
        store = RunStore(xcom["run_dir"], **_opts(s3))
        with store.working_copy("send_shard", shard=(shard, SHARDS)) as folder:
            local = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        own = {f"batches/{b.file}" for b in manifest.shard(shard, SHARDS)}
        assert own
        # The rendered content: the guard rebuilds every body's shared part from it; and the
        # whole audience, which no shared part may show.
        content = {f"content/{locale}.json" for locale in {b.locale for b in manifest.batches}}
        audience = {SNAPSHOT} | ({SUPPRESSED} & set(store.listing()))
        record = set(RECORD)  # who owns the folder, and that it is frozen (``run_record``)
        assert set(store.last.fetched) == {SPEC, MANIFEST} | content | audience | own | record
        assert local == {SPEC, MANIFEST} | content | audience | own | record
        assert store.last.uploaded == {}  # it wrote nothing (no dry run)
        assert not folder.exists()  # the working copy is gone afterwards


def test_a_missing_input_fails_the_stage_naming_the_file_and_its_writer(s3: S3Server) -> None:
    xcom = prepare(s3, "missing")
    store = RunStore(xcom["run_dir"], **_opts(s3))
    ran = False
    with pytest.raises(StagingError) as caught, store.working_copy("freeze_batches"):
        ran = True
    assert not ran
    message = str(caught.value)
    assert "envelopes.parquet" in message
    assert "build_envelopes" in message
    assert xcom["run_dir"] in message


def test_a_failed_stage_still_uploads_what_it_wrote(s3: S3Server) -> None:
    """A failing gate's result and Data Docs, or the report of an incomplete run, are what an
    operator reads next: they must reach the run folder too."""
    xcom = prepare(s3, "failing")
    store = RunStore(xcom["run_dir"], **_opts(s3))
    with (  # noqa: PT012
        pytest.raises(RuntimeError, match="the stage failed"),
        store.working_copy("render_content") as folder,
    ):
        (folder / "content").mkdir()
        (folder / "content" / "en.json").write_text("{}")
        raise RuntimeError("the stage failed")
    assert "content/en.json" in s3.keys("failing/winter_update/manual__s3")


def test_a_stage_replacing_a_folder_removes_stale_objects_and_keeps_undeclared_files_local(
    s3: S3Server,
) -> None:
    xcom = prepare(s3, "replace")
    fs = s3.filesystem()
    base = f"{s3.bucket}/replace/winter_update/manual__s3"
    fs.pipe({f"{base}/batches/old-00001.json": b"{}", f"{base}/envelopes.parquet": b"x"})
    fs.pipe({f"{base}/content/en.json": b"{}", f"{base}/audience/valid.parquet": b"x"})
    fs.pipe(f"{base}/audience/snapshot.parquet", b"x")
    store = RunStore(xcom["run_dir"], **_opts(s3))
    with store.working_copy("freeze_batches") as folder:
        (folder / "batches").mkdir(exist_ok=True)
        (folder / "batches" / "en-00001.json").write_text("{}")
        (folder / "batches" / "manifest.json").write_text("{}")
        (folder / "scratch.txt").write_text("not declared by the stage")
    objects = s3.keys("replace/winter_update/manual__s3")
    assert "batches/en-00001.json" in objects
    assert "batches/old-00001.json" not in objects
    assert "scratch.txt" not in objects
    assert store.last.removed == ["batches/old-00001.json"]
    assert list(store.last.uploaded) == ["batches/en-00001.json", MANIFEST]


def test_a_local_staging_folder_is_used_in_place(tmp_path: Path) -> None:
    folder = tmp_path / "staging" / "winter_update" / "run"
    (folder / "batches").mkdir(parents=True)
    manifest = folder / MANIFEST
    manifest.write_text('{"batches": []}')
    inode = manifest.stat().st_ino
    store = RunStore(str(folder))
    assert store.remote is False
    with store.working_copy("send_shard", shard=(0, 2)) as working:
        assert working == folder
        assert working.joinpath(MANIFEST).stat().st_ino == inode
        (working / "dry_run_outbox").mkdir()
        (working / "dry_run_outbox" / "x.json").write_text("{}")
    assert (folder / "dry_run_outbox" / "x.json").exists()
    assert store.last.fetched == store.last.uploaded == {}
    assert store._fs is None  # no filesystem was even opened
    assert RunStore(f"file://{folder}").remote is False


def test_credentials_stay_out_of_logs_and_reprs(
    s3: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailroom")
    xcom = prepare(s3, "quiet")
    store = RunStore(xcom["run_dir"], **_opts(s3))
    with store.working_copy("extract_audience"):
        pass
    assert "fetched 2 file(s)" in caplog.text  # the spec and run.json
    for text in (caplog.text, repr(store)):
        assert SECRET not in text
    with pytest.raises(StagingError) as caught, store.working_copy("validate_audience"):
        pass
    assert SECRET not in str(caught.value)


def test_every_task_of_the_dag_opens_a_declared_stage() -> None:
    """The task ids of the DAG, the stage names its task bodies open, and ``STAGES`` agree
    (read from the files: the unit tier imports no Airflow)."""
    import ast

    def calls(path: Path) -> list[ast.Call]:
        tree = ast.parse(path.read_text("utf-8"))
        return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]

    def name(call: ast.Call) -> str:
        return ast.unparse(call.func).rsplit(".", 1)[-1]

    dag_file = REPO / "dags" / "mailroom_campaign.py"
    tasks = {
        node.name
        for node in ast.walk(ast.parse(dag_file.read_text("utf-8")))
        if isinstance(node, ast.FunctionDef)
        and any(ast.unparse(d).startswith("task") for d in node.decorator_list)
    }
    operators = {
        kw.value.value
        for call in calls(dag_file)
        for kw in call.keywords
        if kw.arg == "task_id" and isinstance(kw.value, ast.Constant)
    }
    opened = {
        str(arg.value)
        for call in calls(REPO / "src" / "mailroom_airflow" / "tasks.py")
        if name(call) in {"_working", "working_copy"}
        for arg in call.args
        if isinstance(arg, ast.Constant)
    }
    assert opened == set(STAGES)
    assert (tasks | operators) - {"plan_shards"} == set(STAGES)  # plan_shards reads XCom only


def test_an_operator_fetches_a_whole_run_folder(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailroom.cli.main import main

    xcom = prepare(s3, "operator")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.storage_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    dest = tmp_path / "run"
    code = main(["fetch-run", xcom["run_dir"], str(dest), "--endpoint-url", s3.endpoint_url])
    assert code == 0
    assert (dest / SPEC).read_bytes() == (
        REPO / "include/campaigns/winter_update.yaml"
    ).read_bytes()
    assert (
        main(
            [
                "fetch-run",
                s3.url("nothing/here"),
                str(tmp_path / "x"),
                "--endpoint-url",
                s3.endpoint_url,
            ]
        )
        == 1
    )
