"""The campaign's stages as functions over one run's staging directory.

Each function is what one DAG task does, and has the task's name (so has the domain function it
calls): it reads the run's files, writes its own, and returns a small JSON-able dict (paths,
counts, digests) for XCom. Secrets and database URLs are passed in by the caller, which resolves
them from Airflow connections; nothing here knows about Airflow.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from itertools import chain, islice, repeat
from pathlib import Path
from typing import Any

from mailroom import batches, content, earlier_runs, envelopes, run_inputs, run_record
from mailroom.approval import canary, summary
from mailroom.audience import extract, validate
from mailroom.batches import Manifest, batch_id_for, load_manifest
from mailroom.campaign_spec import CampaignSpec, campaign_path, load_campaign
from mailroom.checks import quality_gate
from mailroom.checks.audience_data import People, shared_audience_data
from mailroom.content import LocaleContent
from mailroom.delivery import report, shards
from mailroom.delivery.outbox import Outbox, StagedBatch
from mailroom.delivery.rate import SharedRateLimiter
from mailroom.delivery.transports.base import Transport
from mailroom.errors import EnvelopeViolation, ValidationFailed
from mailroom.run import ProjectPaths, Run
from mailroom.staging import RunStaging, read_json, run_location, write_json

__all__ = [
    "ProjectPaths",
    "Run",
    "build_envelopes",
    "canary_send",
    "check_envelopes",
    "extract_audience",
    "freeze_batches",
    "guard_shard",
    "prepare",
    "reconcile",
    "render_content",
    "send_shard",
    "summarise",
    "validate_audience",
]

log = logging.getLogger(__name__)

MAX_SHARDS = 256


def prepare(
    paths: ProjectPaths,
    *,
    campaign: str,
    run_id: str,
    staging_root: Path | str,
    shard_count: int,
    dry_run: bool,
    working_dir: Path | None = None,
    resolve: Callable[[CampaignSpec], object] | None = None,
    triggered_by: str | None = None,
) -> Run:
    """Check the campaign and freeze a copy of its spec into the run folder (written in
    ``working_dir`` when the folder is on object storage, which the caller then uploads).
    ``run.json`` records who triggered the run (``triggered_by``), when, and its shard count.

    ``resolve``: the caller resolves everything the run will need from outside (the audience's
    connection, the outbox, the transport's connection and key, the unsubscribe secret) for the
    checked spec, before anything is written; whatever it raises fails the run here, before
    extract, rather than at send after an approval."""
    spec = load_campaign(paths.campaigns, campaign)
    if not 1 <= shard_count <= MAX_SHARDS:
        raise ValidationFailed(f"shard count must be 1..{MAX_SHARDS}, got {shard_count}")
    if resolve is not None:
        resolve(spec)
    location = run_location(staging_root, spec.name, run_id)
    root = working_dir or Path(location)
    # Before anything is written: a folder another run id owns, or a frozen run, is refused.
    run_record.claim_folder(
        root,
        campaign=spec.name,
        run_id=run_id,
        details={
            "triggered_by": triggered_by,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "shards": shard_count,
            "dry_run": dry_run,
        },
    )
    staging = RunStaging(root).create()
    run = Run(spec.name, run_id, staging, shard_count, dry_run, location)
    shutil.copyfile(campaign_path(paths.campaigns, campaign), run.spec_copy)
    log.info(
        "prepare: campaign %s, run folder %s, %d shard(s), dry_run=%s",
        spec.name,
        location,
        shard_count,
        dry_run,
    )
    return run


@run_record.stage("extract_audience")
def extract_audience(
    run: Run, *, sql_url: str | None, outbox: Outbox | None = None
) -> dict[str, Any]:
    """The audience snapshot, without the campaign's suppressions nor, given the ``outbox``,
    anyone on its suppression list (``Outbox.suppressed_keys``: every campaign's). Without an
    ``outbox`` (a caller with no suppression list) only the campaign's own apply."""
    counts = extract.extract_audience(
        run.spec(),
        sql_url=sql_url,
        snapshot=run.staging.snapshot,
        suppressed_out=run.staging.suppressed,
        outbox_suppressions=outbox.suppressed_keys() if outbox is not None else None,
    )
    write_json(run.staging.extract_counts, counts.to_dict())
    return counts.to_dict()


@run_record.stage("validate_audience")
def validate_audience(run: Run) -> dict[str, Any]:
    st = run.staging
    outcome = validate.validate_audience(
        run.spec(),
        snapshot=st.snapshot,
        valid_out=st.valid_audience,
        quarantine_out=st.quarantine,
        suppressed=st.suppressed,
        data_docs_dir=st.audience_data_docs,
    )
    write_json(st.audience_validation, outcome.to_dict())
    return {k: v for k, v in outcome.to_dict().items() if k != "gx"}


@run_record.stage("render_content")
def render_content(run: Run, paths: ProjectPaths) -> dict[str, Any]:
    spec = run.spec()
    contents = content.render_content(spec, paths.templates, paths.translations)
    for locale, rendered in contents.items():
        write_json(run.staging.content_file(locale), rendered.to_dict())
    return {
        locale: {"subject": c.subject, "untranslated": len(c.untranslated)}
        for locale, c in contents.items()
    }


def load_contents(run: Run) -> dict[str, LocaleContent]:
    return {
        loc: LocaleContent.from_dict(read_json(run.staging.content_file(loc)))
        for loc in run.spec().locales
    }


@run_record.stage("build_envelopes")
def build_envelopes(
    run: Run,
    *,
    secret: bytes,
    outbox: Outbox | None = None,
    resend: earlier_runs.ResendChoice | None = None,
    chunk_rows: int | None = None,
) -> dict[str, Any]:
    """One envelope per valid recipient, except those another run of the campaign sent to or
    left in doubt (``earlier_runs``; unless ``resend``), as the ``outbox`` records them now.
    Leaving them out here, before any envelope exists, keeps every later layer (freeze, the
    gate's expected count, the guard's members, the approval) on exactly who this run sends to;
    ``left_out.json`` records how many were left out, why, and the resend choice.

    Without an ``outbox`` (a caller with no campaign history) nobody is left out. The audience,
    the earlier recipients and the left out are read ``chunk_rows`` at a time (default
    ``envelopes.CHUNK_ROWS``): nothing here holds the whole audience at once."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    st = run.staging
    choice = resend or earlier_runs.ResendChoice()
    chunk = chunk_rows or envelopes.CHUNK_ROWS
    left_out_file = earlier_runs.left_out_parquet(st)
    left_out_file.unlink(missing_ok=True)
    reasons: Counter[str] = Counter()
    by_run: Counter[str] = Counter()
    would = Counter[str]()
    with earlier_runs.EarlierRecipients(
        outbox.earlier_outcomes(run.run_key) if outbox is not None else ()
    ) as found:
        count = envelopes.build_envelopes(
            run.spec(),
            valid_audience=st.valid_audience,
            out=st.envelopes,
            secret=secret,
            leave_out=None if choice.resend else found,
            left_out_out=left_out_file,
            chunk_rows=chunk,
        )
        if choice.resend and found:
            for rows in envelopes.parquet_in_chunks(st.valid_audience).iter_batches(
                batch_size=chunk, columns=["email"]
            ):
                keys = [str(e).lower() for e in rows.column(0).to_pylist()]
                known = found.reasons(keys)
                would.update(known[key][0] for key in keys if key in known)
    if left_out_file.exists():
        for rows in envelopes.parquet_in_chunks(left_out_file).iter_batches(
            batch_size=chunk, columns=["reason", "earlier_run"]
        ):
            for counter, column in ((reasons, rows.column(0)), (by_run, rows.column(1))):
                for value in pc.value_counts(column).to_pylist():
                    counter[value["values"]] += int(value["counts"])
    record = earlier_runs.write_record(
        st,
        choice=choice,
        valid=pq.ParquetFile(st.valid_audience).metadata.num_rows,
        left_out=reasons,
        by_run=Counter({k.split("/", 1)[-1]: v for k, v in by_run.items()}),
        would_leave_out=would,
        sending_run=outbox.sending_run(run.campaign) if outbox is not None else None,
    )
    log.info(
        "build_envelopes: %d envelopes; left out: %s; resend: %s",
        count,
        record["left_out"],
        choice.resend,
    )
    return {"envelopes": count, "left_out": record["left_out"], "resend": choice.resend}


@run_record.stage("freeze_batches")
def freeze_batches(
    run: Run, *, outbox: Outbox, build_body: Any = None, chunk_rows: int = batches.CHUNK_ROWS
) -> dict[str, Any]:
    """Write the request bodies and manifest, and stage every batch in the outbox.

    The outbox also records the digests of the files every request is rebuilt from
    (``run_inputs``), so a run folder rewritten afterwards is refused by the gate and the guard.
    Who each batch is for follows from the envelopes alone (each locale's, ``batch_size`` at a
    time), so the outbox takes the recipients in a second thread while the bodies are written
    (both mostly outside the GIL: the database, Arrow, hashing, files); the manifest digest and
    the batches follow, in the same transaction, once frozen. Both read the envelopes
    ``chunk_rows`` at a time, so neither holds the whole audience nor every personalization at
    once; the bodies, the manifest and the staged rows are the same whatever the chunk size.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    st = run.staging
    spec = run.spec()
    plan = _batch_plan(spec, st.envelopes, chunk_rows=chunk_rows)
    kwargs = {"build_body": build_body} if build_body is not None else {}
    frozen: Future[tuple[str, list[StagedBatch]]] = Future()
    inputs = run_inputs.input_digests(st, spec.locales)
    left_out = earlier_runs.read_record(st)
    resend = earlier_runs.ResendChoice.from_dict(left_out)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="freeze-outbox") as pool:
        staging = pool.submit(
            outbox.stage_members_first,
            run.run_key,
            _members_by_envelope(plan, st.envelopes, chunk_rows=chunk_rows),
            frozen.result,
            inputs,
            resend_reason=resend.reason if resend.resend else None,
        )
        try:
            manifest = batches.freeze_batches(
                spec,
                run_id=run.run_id,
                envelopes=st.envelopes,
                contents=load_contents(run),
                batches_dir=st.batches_dir,
                manifest_path=st.manifest,
                chunk_rows=chunk_rows,
                **kwargs,
            )
            if [(b.batch_id, b.locale, b.recipients) for b in manifest.batches] != plan:
                raise ValidationFailed(
                    "the frozen batches are not the ones planned from the envelopes "
                    f"({len(manifest.batches)} frozen, {len(plan)} planned)"
                )
            frozen.set_result(
                (
                    manifest.sha256,
                    [
                        StagedBatch(b.batch_id, b.index, b.locale, b.sha256, b.recipients)
                        for b in manifest.batches
                    ],
                )
            )
        except BaseException as exc:
            frozen.set_exception(exc)  # the outbox rolls back: nothing of the run is staged
            raise
        staging.result()
    log.info(
        "freeze: %d batches, %d recipients, manifest %s",
        len(manifest.batches),
        manifest.recipients,
        manifest.sha256,
    )
    return manifest_summary(manifest, run.shard_count)


def _batch_plan(
    spec: CampaignSpec, envelopes: Path, *, chunk_rows: int = batches.CHUNK_ROWS
) -> list[tuple[str, str, int]]:
    """(batch id, locale, recipients) of every request, in the order they are frozen: each
    locale's envelopes ``batch_size`` at a time. The locales are counted ``chunk_rows``
    envelopes at a time."""
    import pyarrow.compute as pc

    from mailroom.envelopes import parquet_in_chunks

    counts: Counter[str] = Counter()
    for chunk in parquet_in_chunks(envelopes).iter_batches(
        batch_size=chunk_rows, columns=["locale"]
    ):
        for row in pc.value_counts(chunk.column(0)).to_pylist():
            counts[str(row["values"])] += int(row["counts"])
    plan = []
    for locale in spec.locales:
        count = counts.get(locale, 0)
        for seq, start in enumerate(range(0, count, spec.batch_size), 1):
            plan.append((batch_id_for(locale, seq), locale, min(spec.batch_size, count - start)))
    return plan


def _members_by_envelope(
    plan: list[tuple[str, str, int]], envelopes: Path, *, chunk_rows: int = batches.CHUNK_ROWS
) -> Iterator[tuple[str, str, str, str]]:
    """(email, user id, batch id, values digest) of every recipient, from the envelopes (not from
    the request bodies): a locale's batches take its envelopes in order, one locale at a time,
    read ``chunk_rows`` at a time (the outbox takes them as they come)."""
    by_locale: dict[str, list[tuple[str, int]]] = {}
    for batch_id, locale, recipients in plan:
        by_locale.setdefault(locale, []).append((batch_id, recipients))
    for locale, locale_batches in by_locale.items():
        batch_ids = chain.from_iterable(repeat(batch_id, n) for batch_id, n in locale_batches)
        for rows in batches.locale_envelopes(
            envelopes, locale, ("email", "user_id", "values_sha256"), chunk_rows
        ):
            yield from zip(
                rows.column("email").to_pylist(),
                rows.column("user_id").to_pylist(),
                islice(batch_ids, rows.num_rows),
                rows.column("values_sha256").to_pylist(),
                strict=True,
            )
        if next(batch_ids, None) is not None:
            raise ValueError(f"the plan holds more recipients of locale {locale} than envelopes")


def manifest_summary(manifest: Manifest, shard_count: int) -> dict[str, Any]:
    shards = min(shard_count, max(len(manifest.batches), 1))
    return {
        "manifest_sha256": manifest.sha256,
        "batches": len(manifest.batches),
        "recipients": manifest.recipients,
        "per_locale": manifest.per_locale(),
        "shards": list(range(shards)),
    }


@run_record.stage("check_envelopes")
def check_envelopes(
    run: Run, paths: ProjectPaths, *, secret: bytes, outbox: Outbox
) -> dict[str, Any]:
    """The data-quality gate. It renders every locale's content itself, from the project's
    templates and catalogs (never the render stage's output), rebuilds each batch's shared part
    from that and the spec, holds it to everyone the extract read (``audience_data``), and holds
    every body to the digest the outbox staged it with."""
    st = run.staging
    # Everyone valid, less those an earlier run of the campaign sent to (``build_envelopes``).
    valid = read_json(st.audience_validation)["valid"] - earlier_runs.left_out_total(st)
    spec = run.spec()
    contents = content.render_content(spec, paths.templates, paths.translations)
    manifest = load_manifest(st.manifest)
    shared = batches.shared_parts(spec, contents, manifest)
    people = People.read(run_inputs.audience_files(st))
    result = quality_gate.check_envelopes(
        spec,
        manifest_path=st.manifest,
        valid_audience=st.valid_audience,
        secret=secret,
        expected_recipients=valid,
        shared=shared,
        staged=_as_staged(run, manifest, outbox, contents),
        audience_data=shared_audience_data(spec, shared, people),
        data_docs_dir=st.gate_data_docs,
    )
    write_json(st.gate_result, result.to_dict())
    if not result.success:
        raise ValidationFailed(
            "the data-quality gate failed on the frozen batches; nothing will be sent: "
            + "; ".join(result.failures())
            + f" (Great Expectations Data Docs: {run.where(st.root / (result.data_docs or ''))})"
        )
    return {
        "success": True,
        "personalizations": result.personalizations,
        "batches": result.batches,
        "data_docs": result.data_docs,
    }


def _as_staged(
    run: Run, manifest: Manifest, outbox: Outbox, contents: dict[str, LocaleContent]
) -> dict[str, str]:
    """The digest each batch must have, as the outbox staged it (by batch id), for the gate's
    ``staged_matches``: none at all unless the manifest and the batches are the ones the outbox
    staged and the spec's copy and the validated audience are the files it recorded; none for a
    locale whose recorded content is not what the gate rendered."""
    st = run.staging
    recorded = outbox.staged_inputs(run.run_key)
    staged = outbox.staged_digests(run.run_key)
    if outbox.manifest_sha256(run.run_key) != manifest.sha256 or set(staged) != {
        b.batch_id for b in manifest.batches
    }:
        log.error("check_envelopes: the manifest is not the one the outbox staged")
        return {}
    try:
        run_inputs.check_inputs(
            st, recorded, [st.campaign_spec, st.valid_audience, *run_inputs.audience_files(st)]
        )
    except EnvelopeViolation as exc:
        log.error("check_envelopes: %s", exc)
        return {}
    as_rendered = {
        locale
        for locale, rendered in contents.items()
        if recorded.get(run_inputs.relative(st, st.content_file(locale)))
        == run_inputs.content_digest(rendered)
    }
    for locale in sorted(set(contents) - as_rendered):
        log.error(
            "check_envelopes: the content the run was staged with for %s is not what the gate "
            "renders from the templates and catalogs",
            locale,
        )
    return {b.batch_id: staged[b.batch_id] for b in manifest.batches if b.locale in as_rendered}


def _approved(
    run: Run, manifest_sha256: str, outbox: Outbox
) -> tuple[Manifest, dict[str, dict[str, Any]]]:
    """The run's manifest and each body's shared part as the approved inputs give it, refused
    unless the manifest and the outbox's are the approved one, the spec's copy, the rendered
    content and the audience files are the ones the run was staged from, and no shared part
    shows anyone's data (everyone the extract read: ``audience_data``)."""
    st = run.staging
    manifest = load_manifest(st.manifest, expected_sha256=manifest_sha256)
    staged_sha = outbox.manifest_sha256(run.run_key)
    if staged_sha != manifest_sha256:
        raise ValidationFailed(f"the outbox holds manifest {staged_sha}, not the approved one")
    spec = run.spec()
    audience = run_inputs.audience_files(st)
    run_inputs.check_inputs(
        st,
        outbox.staged_inputs(run.run_key),
        [st.campaign_spec, *(st.content_file(locale) for locale in spec.locales), *audience],
    )
    shared = batches.shared_parts(spec, load_contents(run), manifest)
    shown = shared_audience_data(spec, shared, People.read(audience))
    showing = [b.batch_id for b in manifest.batches if shown[b.sha256]]
    if showing:
        raise EnvelopeViolation(
            f"what every recipient of {len(showing)} request(s) sees (first: {showing[0]}) shows "
            f"{sum(shown.values())} piece(s) of audience data: an address, user id or "
            "unsubscribe link of someone in the audience, in the approved spec or content"
        )
    return manifest, shared


@run_record.stage("guard_shard")
def guard_shard(
    run: Run,
    *,
    manifest_sha256: str,
    outbox: Outbox,
    shard: int = 0,
    shard_count: int = 1,
) -> dict[str, Any]:
    """The envelope guard on every request of one shard (by default the whole run as one
    shard), before any request of the run is sent: ``send`` starts only once every shard has
    passed."""
    try:
        manifest, shared = _approved(run, manifest_sha256, outbox)
    except EnvelopeViolation as exc:
        outbox.request_halt(run.run_key, reason=f"envelope guard: {exc}")
        log.error("guard shard %d: %s; the run is halted, nothing was sent", shard, exc)
        raise
    return shards.guard_shard(
        run_key=run.run_key,
        manifest=manifest,
        shared=shared,
        public=run.spec().public_addresses,
        batches_dir=run.staging.batches_dir,
        shard_index=shard,
        shard_count=shard_count,
        outbox=outbox,
    )


@run_record.stage("send_shard")
def send_shard(
    run: Run,
    *,
    shard: int,
    manifest_sha256: str,
    transport: Transport,
    outbox: Outbox,
    shard_count: int,
    halt_signal: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    spec = run.spec()
    manifest, shared = _approved(run, manifest_sha256, outbox)
    limiter = SharedRateLimiter(
        outbox, run.run_key, spec.rate.requests_per_second, spec.rate.recipients_per_second
    )
    with transport:
        return shards.send_shard(
            run_key=run.run_key,
            manifest=manifest,
            shared=shared,
            public=spec.public_addresses,
            batches_dir=run.staging.batches_dir,
            shard_index=shard,
            shard_count=shard_count,
            transport=transport,
            outbox=outbox,
            limiter=limiter,
            max_consecutive_failures=spec.max_consecutive_failures,
            halt_signal=halt_signal,
            max_in_flight=spec.max_in_flight,
        )


@run_record.stage("reconcile")
def reconcile(run: Run, *, outbox: Outbox | None, approval: dict[str, Any]) -> dict[str, Any]:
    """The report. Once the run is frozen its first final report stands (``run_record``): the
    new one is made aside, and written (as ``reports/<n>.json``) only when it differs, never
    over ``report.json``."""
    import tempfile

    st = run.staging
    manifest = load_manifest(st.manifest) if st.manifest.exists() else None
    keep = st.report.exists() and run_record.is_frozen(st.root, run.run_key, outbox)
    with tempfile.TemporaryDirectory(prefix="mailroom-reconcile-") as scratch:
        not_sent = Path(scratch) / "not_sent.csv" if keep else st.not_sent
        result = _reconciled(run, manifest, outbox, approval, not_sent)
        result["not_sent_file"] = run.where(st.not_sent)
        if keep:
            return run_record.keep_first_report(run, result, not_sent)
    write_json(st.report, result)
    log.info("report: status %s, %s", result["status"], result.get("equation"))
    return result


def _reconciled(
    run: Run,
    manifest: Manifest | None,
    outbox: Outbox | None,
    approval: dict[str, Any],
    not_sent: Path,
) -> dict[str, Any]:
    st = run.staging
    return report.reconcile(
        run_key=run.run_key,
        manifest=manifest,
        outbox=outbox if manifest is not None else None,
        extract_counts=read_json(st.extract_counts) if st.extract_counts.exists() else None,
        validation=read_json(st.audience_validation) if st.audience_validation.exists() else None,
        approval=approval,
        quarantine=st.quarantine if st.quarantine.exists() else None,
        not_sent_csv=not_sent,
        left_out=earlier_runs.read_record(st),
        left_out_rows=earlier_runs.left_out_parquet(st),
    )


@run_record.stage("canary_send")
def canary_send(run: Run, *, secret: bytes, transport: Transport) -> dict[str, Any]:
    """Send the frozen content to the campaign's seed list (nothing when it has none)."""
    return canary.canary_send(
        run.spec(),
        run_id=run.run_id,
        contents=load_contents(run),
        secret=secret,
        transport=transport,
        out_dir=run.staging.canary_dir,
    )


@run_record.stage("summarise")
def summarise(run: Run, *, triggered_by: str | None, console_url: str | None = None) -> str:
    """What the approver reads: counts, checks, a preview per locale, the manifest digest;
    ``console_url``: the run's page in the campaign console, linked instead of file paths."""
    return summary.summarise(run, triggered_by=triggered_by, console_url=console_url)
