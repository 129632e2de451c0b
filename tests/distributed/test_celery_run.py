"""The same DAG on Airflow's distributed executor: CeleryExecutor, PostgreSQL, Redis, two workers.

Real processes only: api-server, scheduler, dag-processor and two ``airflow celery worker``
processes (different Celery node names, concurrency 2 each), the metadata and the outbox in
fresh PostgreSQL databases, the broker on the local Redis, staging on a local S3-compatible
server (moto's server mode, started here: each task fetches what its stage reads and uploads
what it wrote, as workers on different hosts would), and the SendGrid-compatible dev server as
the provider. A 20,000-user campaign is
triggered and approved through the REST API. Once one worker has finished a shard and started
another, it is SIGKILLed with everything under it, as a crashed host would be; Airflow notices the
missing heartbeats and retries the shard on the other worker. The dev server must then have
received every expected recipient exactly once: nobody twice, nobody missing except the
recipients of a batch the outbox marked ``unknown`` (a request cut off mid-flight, which is never
resent automatically, and which the dev server may or may not have accepted: at most once).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import quote

import psutil
import pytest
import requests
import yaml

from mailroom.audience.sample import generate
from mailroom.cli.airflow_api import AirflowApi
from mailroom.cli.local_airflow import LocalAirflow, free_port
from mailroom.delivery.outbox import BatchState, Outbox
from mailroom.staging import run_folder_name
from sendgrid_dev import accepted_recipients, read_accepted
from support.local_services import PG_HOST, PG_PORT, PG_USER, Broker, Databases
from support.processes import stop_process_group
from support.s3_server import KEY, SECRET, S3Server, s3_server_process

pytestmark = [pytest.mark.distributed, pytest.mark.postgres, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "mailroom_campaign"
CAMPAIGN = "winter_update"
USERS = 20_000
BATCH_SIZE = 100  # ~190 requests instead of ~20
SHARDS = 8  # two waves on four worker slots: each worker finishes shards, then one is killed
REQUESTS_PER_SECOND = 5  # the campaign-wide rate: sending takes ~40 s, long enough to kill
WORKERS = ("mailroom-worker-a", "mailroom-worker-b")
CONCURRENCY = 2
HEARTBEAT_TIMEOUT = 30  # seconds without a task heartbeat before the scheduler fails the try
QUEUED_TIMEOUT = 120  # seconds a try may wait in the executor's queue before it is requeued


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    data_dir = tmp_path / "sendgrid-dev"
    log = (tmp_path / "sendgrid-dev.log").open("ab")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "sendgrid_dev", "--port", "0"),
            *("--data-dir", str(data_dir), "--log-every", "50"),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,
    )
    try:
        stdout = cast(IO[bytes], proc.stdout)  # never None: stdout=subprocess.PIPE
        line = stdout.readline().decode().strip()
        assert line.startswith("mailroom-sendgrid-dev listening on "), line
        yield line.rsplit(" ", 1)[1], data_dir
    finally:
        stop_process_group(proc)
        log.close()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    with s3_server_process(tmp_path / "moto.log") as server:
        yield server


def test_celery_run_on_two_workers_survives_a_killed_worker(
    tmp_path: Path,
    fresh_databases: Databases,
    broker: Broker,
    dev_server: tuple[str, Path],
    s3: S3Server,
) -> None:
    started = time.monotonic()
    dev_url, dev_data = dev_server
    staging = s3.url("staging")  # no folder shared between the workers: the object store
    work = tmp_path / "tmp"  # the task processes' temporary folders (their working copies)
    work.mkdir()
    include = tmp_path / "include"
    airflow = LocalAirflow(
        REPO,
        tmp_path / "airflow",
        port=free_port(),
        parallelism=2 * CONCURRENCY * len(WORKERS),
        executor="CeleryExecutor",
        database_url=Databases.url(fresh_databases.metadata),
        extra_env={
            "AIRFLOW__CELERY__BROKER_URL": broker.url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+"
            + Databases.url(fresh_databases.metadata, driver="postgresql"),
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": broker.queue,
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            # A shard the killed worker had taken from the broker but not started stays
            # 'queued' (Redis hands the message to nobody else before its visibility timeout,
            # hours): the scheduler requeues it after this many seconds (default 600).
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(QUEUED_TIMEOUT),
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "10",
            "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "5",
            "MAILROOM_STAGING_ROOT": staging,
            "MAILROOM_INCLUDE_DIR": str(include),
            "TMPDIR": str(work),
        },
    )
    _require_celery_executor(airflow)
    _campaign_include(include)
    audience = generate(tmp_path / "users.sqlite", users=USERS)
    try:
        airflow.migrate()
        airflow.import_connections(
            {
                "mailroom_users": {"conn_type": "sqlite", "host": str(audience.path)},
                "mailroom_sendgrid": {
                    "conn_type": "http",
                    "host": dev_url,
                    "password": "SG.distributed-test-key",
                    "extra": json.dumps({"timeout": 30}),
                },
                "mailroom_outbox": {
                    "conn_type": "postgres",
                    "host": PG_HOST,
                    "port": PG_PORT,
                    "login": PG_USER,
                    "schema": fresh_databases.outbox,
                },
                "mailroom_staging": {
                    "conn_type": "generic",
                    "login": KEY,
                    "password": SECRET,
                    "extra": json.dumps({"endpoint_url": s3.endpoint_url}),
                },
            }
        )
        airflow.import_variables({"mailroom_unsubscribe_secret": secrets.token_urlsafe(32)})
        airflow.start()
        workers = {
            name: airflow.start_celery_worker(
                f"{name}-{broker.token}", concurrency=CONCURRENCY, queues=broker.queue
            )
            for name in WORKERS
        }
        hostnames = {name: f"{name}-{broker.token}" for name in WORKERS}
        airflow.serve_dag(DAG_ID, timeout=240)
        analyst, approver = airflow.api("analyst"), airflow.api("approver")
        run_id = analyst.trigger(DAG_ID, {"campaign": CAMPAIGN, "dry_run": False, "shards": SHARDS})
        run_key = f"{CAMPAIGN}/{run_id}"

        _wait_for_task_state(analyst, run_id, "approve", "awaiting_input", timeout=900)
        time.sleep(2.5)  # Airflow 3.3.2 can fail an approval answered within ~1 s of the wait
        approver.answer(DAG_ID, run_id, "approve", "Approve")
        _wait_for_task_state(analyst, run_id, "approve", "success", timeout=120)

        # Wait until worker A has finished a shard and is running another, then kill it.
        victim, survivor = WORKERS
        killed_shards = _kill_mid_send(
            airflow, analyst, run_id, workers[victim], hostnames[victim], timeout=600
        )

        final = analyst.wait_until(
            "the run to finish",
            lambda: _finished(analyst, run_id),
            timeout=900,
            interval=2,
        )
        outbox = Outbox(Databases.url(fresh_databases.outbox))
        try:
            counts = outbox.counts(run_key)
            unknown_batches = [
                b for b, st in outbox.states(run_key).items() if st.state == BatchState.UNKNOWN
            ]
            maybe_received: set[str] = set()
            for batch_id in unknown_batches:
                maybe_received |= {e.lower() for e in outbox.batch_members(run_key, batch_id)}
        finally:
            outbox.dispose()

        # 1. Every batch ended sent, or unknown (cut off by the kill); nothing failed or hangs.
        batches = {state: counts[state]["batches"] for state in BatchState}
        recipients = {state: counts[state]["recipients"] for state in BatchState}
        assert batches[BatchState.FAILED] == batches[BatchState.HALTED] == 0, counts
        assert batches[BatchState.STAGED] == batches[BatchState.SENDING] == 0, counts
        assert batches[BatchState.UNKNOWN] <= len(killed_shards), counts
        expected_state = "success" if not unknown_batches else "failed"
        assert final == expected_state, (final, counts)

        # 2. The provider's own records: nobody twice, nobody missing, nobody extra.
        records = read_accepted(dev_data)
        received = Counter(e.lower() for e in accepted_recipients(records))
        twice = {e: n for e, n in received.items() if n > 1}
        assert not twice, f"{len(twice)} recipients received the message more than once"
        assert set(received) <= audience.expected, "received by someone outside the audience"
        missing = audience.expected - set(received)
        assert missing <= maybe_received, (
            f"{len(missing - maybe_received)} expected recipients were never sent the message "
            "and are not in an 'unknown' batch"
        )
        assert recipients[BatchState.SENT] + recipients[BatchState.UNKNOWN] == len(
            audience.expected
        )
        for record in records:
            assert len(record["body"]["personalizations"]) <= BATCH_SIZE
            for item in record["body"]["personalizations"]:
                assert len(item["to"]) == 1
                assert "cc" not in item
                assert "bcc" not in item

        # 3. Shards ran on both workers; each killed shard was retried on the survivor.
        tries = {shard: _tries(analyst, run_id, "send_shard", shard) for shard in range(SHARDS)}
        succeeded_on = {
            t["hostname"] for ts in tries.values() for t in ts if t["state"] == "success"
        }
        assert {hostnames[victim], hostnames[survivor]} <= succeeded_on, succeeded_on
        # A shard seen running on the victim may have finished in the moment before the kill
        # (its one try succeeded there): that one was not cut off. Every other was retried on
        # the survivor, and at least one was.
        cut_off = [
            shard
            for shard in killed_shards
            if not (len(tries[shard]) == 1 and tries[shard][0]["state"] == "success")
        ]
        assert cut_off, f"every shard running on {victim} finished before the kill: {tries}"
        for shard in cut_off:
            history = tries[shard]
            assert history[0]["hostname"] == hostnames[victim], history
            assert history[-1]["state"] == "success", history
            assert history[-1]["hostname"] == hostnames[survivor], history
            assert history[-1]["try_number"] >= 2, history
        assert all(ts[-1]["state"] == "success" for ts in tries.values()), tries

        # 4. The run folder is on the object store, whole: the report balances (reconcile ran
        # even if it then failed the run for 'unknown'), every request body the manifest names
        # is there with the size it was frozen with, and nothing is left on the workers' disks
        # but the working copies of the shards the kill cut off.
        prefix = f"staging/{CAMPAIGN}/{run_folder_name(run_id)}"
        objects = s3.keys(prefix)
        fs = s3.filesystem()
        report = json.loads(fs.cat(f"{s3.bucket}/{prefix}/report.json"))
        assert report["balanced"] is True, report
        assert report["status"] == ("sent" if not unknown_batches else "incomplete"), report
        assert (
            report["not_sent_file"]
            == f"{staging}/{CAMPAIGN}/{run_folder_name(run_id)}/not_sent.csv"
        )
        manifest = json.loads(fs.cat(f"{s3.bucket}/{prefix}/batches/manifest.json"))
        assert len(manifest["batches"]) == batches[BatchState.SENT] + batches[BatchState.UNKNOWN]
        for batch in manifest["batches"]:
            assert objects[f"batches/{batch['file']}"] == batch["size"], batch["file"]
        for name in ("campaign.yaml", "envelopes.parquet", "gate/result.json", "approval.json"):
            assert name in objects, name
        assert any(k.startswith("gate/data_docs/") for k in objects)
        assert any(k.startswith("preview/") for k in objects)
        left = sorted(p.name for p in work.iterdir() if p.name.startswith("mailroom-"))
        assert all(n.startswith("mailroom-send_shard-") for n in left), left
        assert len(left) <= len(killed_shards), left
        fetches = _shard_fetches(tmp_path / "airflow" / "logs")
        assert fetches, "no send_shard task logged what it fetched"
        batch_files = len(manifest["batches"])
        assert all(files < batch_files for files, _, _ in fetches), fetches
        print(
            f"\ndistributed run {run_id}: {final}; {len(records)} requests, "
            f"{sum(received.values())} recipients of {len(audience.expected)} expected; "
            f"{len(unknown_batches)} unknown batch(es); killed shard(s) {killed_shards} retried "
            f"on {hostnames[survivor]}; staging {len(objects)} objects, "
            f"{sum(objects.values()):,} bytes; send_shard fetches "
            f"{min(f for f, _, _ in fetches)}-{max(f for f, _, _ in fetches)} files, "
            f"max {max(b for _, b, _ in fetches):,} bytes, "
            f"max {max(t for _, _, t in fetches):.2f}s; {time.monotonic() - started:.0f}s"
        )
    finally:
        airflow.stop()
    # Everything this test started is gone: the API no longer answers.
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{airflow.url}/api/v2/monitor/health", timeout=2)


_FETCHED = re.compile(r"staging: send_shard fetched (\d+) file\(s\), (\d+) bytes, in ([0-9.]+)s")


def _shard_fetches(logs: Path) -> list[tuple[int, int, float]]:
    """(files, bytes, seconds) of every send_shard working copy, from the task logs."""
    found = []
    for path in logs.rglob("*"):
        if path.is_file() and "send_shard" in str(path):
            for match in _FETCHED.finditer(path.read_text("utf-8", errors="replace")):
                found.append((int(match[1]), int(match[2]), float(match[3])))
    return found


def _campaign_include(target: Path) -> Path:
    """A copy of include/ whose campaign uses small batches and a slower campaign-wide rate."""
    shutil.copytree(REPO / "include", target)
    path = target / "campaigns" / f"{CAMPAIGN}.yaml"
    spec = yaml.safe_load(path.read_text("utf-8"))
    spec["batch_size"] = BATCH_SIZE
    spec["rate"] = {"requests_per_second": REQUESTS_PER_SECOND}
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), "utf-8")
    return target


def _require_celery_executor(airflow: LocalAirflow) -> None:
    """Fail with the cause when the installed Celery cannot run Airflow's CeleryExecutor."""
    probe = subprocess.run(
        [sys.executable, "-c", "import airflow.providers.celery.executors.celery_executor"],
        env=airflow.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if probe.returncode != 0:
        versions = subprocess.run(
            [sys.executable, "-m", "pip", "list", "--format", "freeze"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        pins = [line for line in versions.splitlines() if line.split("==")[0] in _CELERY_PINS]
        pytest.fail(
            "Airflow's CeleryExecutor cannot be imported with the installed packages "
            f"({', '.join(pins)}):\n{probe.stderr.strip().splitlines()[-1]}",
            pytrace=False,
        )


_CELERY_PINS = {"celery", "kombu", "redis", "apache-airflow-providers-celery"}


def _states(api: AirflowApi, run_id: str) -> dict[tuple[str, int], dict[str, Any]]:
    return {(ti["task_id"], ti["map_index"]): ti for ti in api.task_instances(DAG_ID, run_id)}


def _wait_for_task_state(
    api: AirflowApi, run_id: str, task_id: str, state: str, timeout: float
) -> None:
    def check() -> bool:
        run_state = api.dag_run(DAG_ID, run_id)["state"]
        ti = _states(api, run_id).get((task_id, -1))
        if ti is not None and ti["state"] == state:
            return True
        if run_state in {"success", "failed"}:
            raise AssertionError(f"run ended {run_state} before {task_id} was {state}")
        return False

    api.wait_until(f"{task_id} to be {state}", check, timeout=timeout)


def _kill_mid_send(
    airflow: LocalAirflow,
    api: AirflowApi,
    run_id: str,
    worker: subprocess.Popen[bytes],
    hostname: str,
    timeout: float,
) -> list[int]:
    """SIGKILL ``worker`` and every process under it once it has finished one shard and is
    running another; returns the map indexes of the shards it was running."""
    deadline = time.monotonic() + timeout
    while True:
        shards = [ti for (task, _), ti in _states(api, run_id).items() if task == "send_shard"]
        on_victim = [ti for ti in shards if ti.get("hostname") == hostname]
        done = [ti for ti in on_victim if ti["state"] == "success"]
        running = [ti["map_index"] for ti in on_victim if ti["state"] == "running"]
        if done and running:
            break
        if shards and all(ti["state"] in {"success", "failed"} for ti in shards):
            pytest.fail(f"every shard finished before {hostname} could be killed mid-send")
        if time.monotonic() > deadline:
            pytest.fail(f"{hostname} never ran a second shard: {shards}")
        time.sleep(0.5)
    tree = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
    airflow.kill(worker)  # SIGKILL to the worker's process group
    for proc in tree:  # and to anything under it that left the group
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert not alive, f"still alive after SIGKILL: {alive}"
    return sorted(running)


def _finished(api: AirflowApi, run_id: str) -> str | None:
    state = str(api.dag_run(DAG_ID, run_id)["state"])
    return state if state in {"success", "failed"} else None


def _tries(api: AirflowApi, run_id: str, task_id: str, map_index: int) -> list[dict[str, Any]]:
    data = api.request(
        "GET",
        f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}"
        f"/{map_index}/tries",
    )
    return sorted(data["task_instances"], key=lambda t: t["try_number"])
