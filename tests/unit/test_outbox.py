"""The outbox on real databases: a SQLite file and the machine's PostgreSQL.

Every state change is a compare-and-set, so the tests race real threads against real row locks
instead of trusting a mock. PostgreSQL is required (CI provides it): when it cannot be reached the
PostgreSQL cases fail and say why, they never skip.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from mailroom.delivery.outbox import (
    Action,
    BatchState,
    NothingToSettle,
    OperatorAction,
    Outbox,
    OutboxConflict,
    RecipientOutcome,
    StagedBatch,
)

pytestmark = pytest.mark.unit

RACE_BATCHES = 200


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outbox]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'outbox.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    box = Outbox(url)
    try:
        yield box
    finally:
        box.dispose()


@pytest.fixture
def run_key() -> str:
    # PostgreSQL's tables live for the whole session: each test gets a run of its own, of a
    # campaign of its own (the runs of one campaign share its sending slot and its recipients).
    unique = uuid.uuid4().hex
    return f"winter_update_{unique[:8]}/manual__{unique}"


def batch(i: int, recipients: int = 2, locale: str = "en") -> StagedBatch:
    return StagedBatch(f"{locale}-{i:05d}", i, locale, f"{i:064x}", recipients)


def members_of(batches: list[StagedBatch]) -> list[tuple[str, str, str]]:
    return [
        (f"User{b.batch_index}.{n}@Example.com", f"u{b.batch_index}-{n}", b.batch_id)
        for b in batches
        for n in range(b.recipients)
    ]


def stage(outbox: Outbox, run_key: str, n: int, recipients: int = 2) -> list[str]:
    batches = [batch(i, recipients) for i in range(n)]
    outbox.stage(run_key, "m" * 64, batches, members_of(batches))
    return [b.batch_id for b in batches]


def state_of(outbox: Outbox, run_key: str) -> dict[str, str]:
    return {bid: st.state for bid, st in outbox.states(run_key).items()}


def drive_to(outbox: Outbox, run_key: str, batch_id: str, target: str) -> None:
    """Move one staged batch to ``target`` through the outbox's own transitions."""
    if target == BatchState.STAGED:
        return
    if target == BatchState.HALTED:
        assert outbox.halt_remaining(run_key, [batch_id]) == 1
        return
    assert outbox.claim(run_key, batch_id)
    if target != BatchState.SENDING:
        outbox.finish(
            run_key,
            batch_id,
            target,
            message_id="m-1" if target == BatchState.SENT else None,
            error=None if target == BatchState.SENT else f"ended {target}",
        )


# -- staging --------------------------------------------------------------------------------


def test_staging_registers_every_batch_and_member_as_staged(outbox: Outbox, run_key: str) -> None:
    ids = stage(outbox, run_key, 3, recipients=2)

    assert outbox.manifest_sha256(run_key) == "m" * 64
    states = outbox.states(run_key)
    assert sorted(states) == ids
    assert {(s.state, s.attempts, s.message_id, s.last_error) for s in states.values()} == {
        (BatchState.STAGED, 0, None, None)
    }
    # Addresses are keyed lower-case: the key is what makes "one address per run" case-blind.
    assert set(outbox.batch_members(run_key, ids[1])) == {
        "user1.0@example.com",
        "user1.1@example.com",
    }
    assert outbox.manifest_sha256("winter_update/no-such-run") is None
    assert outbox.states("winter_update/no-such-run") == {}


def test_a_run_with_no_batches_stages_as_empty(outbox: Outbox, run_key: str) -> None:
    # Reachable when every row is quarantined under max_invalid_fraction: 1.0.
    outbox.stage(run_key, "m" * 64, [], [])

    assert outbox.manifest_sha256(run_key) == "m" * 64
    assert outbox.states(run_key) == {}
    assert outbox.counts(run_key)[BatchState.STAGED] == {"batches": 0, "recipients": 0}


def test_restaging_while_everything_is_staged_replaces_the_old_rows(
    outbox: Outbox, run_key: str
) -> None:
    stage(outbox, run_key, 3)
    replacement = [batch(i, recipients=1, locale="de") for i in range(2)]
    outbox.stage(run_key, "n" * 64, replacement, members_of(replacement))

    assert outbox.manifest_sha256(run_key) == "n" * 64
    assert sorted(outbox.states(run_key)) == ["de-00000", "de-00001"]
    assert outbox.batch_members(run_key, "en-00000") == {}
    assert outbox.counts(run_key)[BatchState.STAGED] == {"batches": 2, "recipients": 2}


@pytest.mark.parametrize(
    "started",
    [BatchState.SENDING, BatchState.SENT, BatchState.FAILED, BatchState.UNKNOWN, BatchState.HALTED],
)
def test_restaging_is_refused_once_any_batch_left_staged(
    outbox: Outbox, run_key: str, started: str
) -> None:
    ids = stage(outbox, run_key, 3)
    drive_to(outbox, run_key, ids[2], started)
    before = state_of(outbox, run_key)

    with pytest.raises(OutboxConflict, match="past 'staged'"):
        outbox.stage(run_key, "n" * 64, [batch(0)], members_of([batch(0)]))

    assert state_of(outbox, run_key) == before
    assert outbox.manifest_sha256(run_key) == "m" * 64


def test_an_address_cannot_be_in_two_batches_of_one_run_whatever_its_case(
    outbox: Outbox, run_key: str
) -> None:
    batches = [batch(0, 1), batch(1, 1)]
    members = [
        ("Anna@Example.com", "u1", batches[0].batch_id),
        ("anna@example.COM", "u2", batches[1].batch_id),
    ]

    with pytest.raises(sa.exc.IntegrityError):
        outbox.stage(run_key, "m" * 64, batches, members)

    # The whole staging was one transaction: nothing of the run is left half-staged.
    assert outbox.states(run_key) == {}
    assert outbox.manifest_sha256(run_key) is None


def test_the_same_address_may_be_in_two_different_runs(outbox: Outbox, run_key: str) -> None:
    other = f"{run_key}-again"
    for key in (run_key, other):
        outbox.stage(key, "m" * 64, [batch(0, 1)], [("anna@example.com", "u1", "en-00000")])
    assert set(outbox.batch_members(other, "en-00000")) == {"anna@example.com"}


# -- claiming and finishing -------------------------------------------------------------------


def test_claim_is_compare_and_set(outbox: Outbox, run_key: str) -> None:
    ids = stage(outbox, run_key, 2)

    assert outbox.claim(run_key, ids[0]) is True
    assert outbox.claim(run_key, ids[0]) is False
    assert outbox.claim(run_key, "en-99999") is False
    assert outbox.claim("winter_update/other-run", ids[1]) is False

    states = outbox.states(run_key)
    assert (states[ids[0]].state, states[ids[0]].attempts) == (BatchState.SENDING, 1)
    assert (states[ids[1]].state, states[ids[1]].attempts) == (BatchState.STAGED, 0)


@pytest.mark.parametrize("done", [BatchState.SENT, BatchState.FAILED, BatchState.UNKNOWN])
def test_a_finished_batch_cannot_be_claimed_again(outbox: Outbox, run_key: str, done: str) -> None:
    [bid] = stage(outbox, run_key, 1)
    drive_to(outbox, run_key, bid, done)
    assert outbox.claim(run_key, bid) is False
    assert outbox.states(run_key)[bid].attempts == 1


def test_two_threads_racing_claim_each_batch_exactly_once(outbox: Outbox, run_key: str) -> None:
    ids = stage(outbox, run_key, RACE_BATCHES, recipients=1)
    barrier = threading.Barrier(2)
    wins: list[list[str]] = [[], []]
    errors: list[BaseException] = []

    def racer(slot: int) -> None:
        try:
            barrier.wait(timeout=10)
            for bid in ids:
                if outbox.claim(run_key, bid):
                    wins[slot].append(bid)
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=racer, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)

    claimed = Counter(wins[0] + wins[1])
    assert sorted(claimed) == sorted(ids)
    assert set(claimed.values()) == {1}
    states = outbox.states(run_key)
    assert {(s.state, s.attempts) for s in states.values()} == {(BatchState.SENDING, 1)}


def test_finish_records_the_outcome_and_only_from_sending(outbox: Outbox, run_key: str) -> None:
    ids = stage(outbox, run_key, 3)

    with pytest.raises(OutboxConflict, match="was not 'sending'"):
        outbox.finish(run_key, ids[0], BatchState.SENT, message_id="never")
    assert outbox.states(run_key)[ids[0]].state == BatchState.STAGED

    assert outbox.claim(run_key, ids[0])
    outbox.finish(run_key, ids[0], BatchState.SENT, message_id="sg-abc")
    with pytest.raises(OutboxConflict):
        outbox.finish(run_key, ids[0], BatchState.FAILED, error="too late")
    assert outbox.claim(run_key, ids[1])
    outbox.finish(run_key, ids[1], BatchState.FAILED, error="x" * 5000)

    states = outbox.states(run_key)
    assert (states[ids[0]].state, states[ids[0]].message_id, states[ids[0]].last_error) == (
        BatchState.SENT,
        "sg-abc",
        None,
    )
    assert states[ids[1]].state == BatchState.FAILED
    assert states[ids[1]].last_error == "x" * 2000


@pytest.mark.parametrize("not_final", [BatchState.STAGED, BatchState.SENDING, "delivered"])
def test_finish_refuses_a_state_that_is_not_final(
    outbox: Outbox, run_key: str, not_final: str
) -> None:
    [bid] = stage(outbox, run_key, 1)
    assert outbox.claim(run_key, bid)
    with pytest.raises(ValueError, match="not a final state"):
        outbox.finish(run_key, bid, not_final)
    assert outbox.states(run_key)[bid].state == BatchState.SENDING


def test_release_puts_a_sending_batch_back_to_staged(outbox: Outbox, run_key: str) -> None:
    [bid] = stage(outbox, run_key, 1)
    assert outbox.claim(run_key, bid)
    outbox.release(run_key, bid, "connection refused")
    assert state_of(outbox, run_key) == {bid: BatchState.STAGED}
    assert outbox.claim(run_key, bid)
    assert outbox.states(run_key)[bid].attempts == 2


# -- interruption, halting and requeueing -------------------------------------------------------


def test_mark_interrupted_turns_sending_into_unknown_and_nothing_else(
    outbox: Outbox, run_key: str
) -> None:
    wanted = [
        BatchState.STAGED,
        BatchState.SENDING,
        BatchState.SENT,
        BatchState.FAILED,
        BatchState.UNKNOWN,
        BatchState.HALTED,
        BatchState.SENDING,
    ]
    ids = stage(outbox, run_key, len(wanted))
    for bid, target in zip(ids, wanted, strict=True):
        drive_to(outbox, run_key, bid, target)
    # The last batch is another shard's: it is left alone although it is 'sending' too.
    mine, others = ids[:-1], ids[-1:]

    assert outbox.mark_interrupted(run_key, mine) == 1
    assert outbox.mark_interrupted(run_key, mine) == 0

    after = outbox.states(run_key)
    assert [after[b].state for b in ids] == [
        BatchState.STAGED,
        BatchState.UNKNOWN,
        BatchState.SENT,
        BatchState.FAILED,
        BatchState.UNKNOWN,
        BatchState.HALTED,
        BatchState.SENDING,
    ]
    assert "interrupted while sending" in (after[ids[1]].last_error or "")
    assert after[others[0]].state == BatchState.SENDING
    assert outbox.mark_interrupted(run_key, []) == 0


def test_halt_flag_is_per_run_and_can_be_lifted(outbox: Outbox, run_key: str) -> None:
    stage(outbox, run_key, 1)
    other = f"{run_key}-other"
    stage(outbox, other, 1)

    assert outbox.halt_requested(run_key) is False
    assert outbox.request_halt(run_key) is True
    assert outbox.halt_requested(run_key) is True
    assert outbox.halt_requested(other) is False
    assert outbox.request_halt(run_key, halted=False) is True
    assert outbox.halt_requested(run_key) is False
    assert outbox.request_halt("winter_update/no-such-run") is False
    assert outbox.halt_requested("winter_update/no-such-run") is False


def test_halt_remaining_halts_only_staged_batches_and_they_can_resume(
    outbox: Outbox, run_key: str
) -> None:
    ids = stage(outbox, run_key, 5)
    drive_to(outbox, run_key, ids[0], BatchState.SENT)
    drive_to(outbox, run_key, ids[1], BatchState.SENDING)

    assert outbox.halt_remaining(run_key, ids[:4]) == 2
    states = outbox.states(run_key)
    assert [states[b].state for b in ids] == [
        BatchState.SENT,
        BatchState.SENDING,
        BatchState.HALTED,
        BatchState.HALTED,
        BatchState.STAGED,
    ]
    assert states[ids[2]].last_error == "halted by an operator"

    # Resuming: a halted batch is claimed like a staged one; a sent one never is.
    assert outbox.claim(run_key, ids[2]) is True
    assert outbox.claim(run_key, ids[0]) is False


def test_requeue_moves_only_the_chosen_states_back_to_staged(outbox: Outbox, run_key: str) -> None:
    wanted = [
        BatchState.SENT,
        BatchState.FAILED,
        BatchState.UNKNOWN,
        BatchState.UNKNOWN,
        BatchState.HALTED,
    ]
    ids = stage(outbox, run_key, len(wanted))
    for bid, target in zip(ids, wanted, strict=True):
        drive_to(outbox, run_key, bid, target)

    assert outbox.requeue(run_key, [BatchState.UNKNOWN]) == 2
    assert [state_of(outbox, run_key)[b] for b in ids] == [
        BatchState.SENT,
        BatchState.FAILED,
        BatchState.STAGED,
        BatchState.STAGED,
        BatchState.HALTED,
    ]
    assert outbox.requeue(run_key, [BatchState.FAILED, BatchState.UNKNOWN]) == 1
    assert state_of(outbox, run_key)[ids[0]] == BatchState.SENT
    assert outbox.claim(run_key, ids[2]) is True
    assert outbox.states(run_key)[ids[2]].attempts == 2


# -- reading ------------------------------------------------------------------------------------


def test_counts_give_batches_and_recipients_for_every_state(outbox: Outbox, run_key: str) -> None:
    ids = stage(outbox, run_key, 6, recipients=3)
    for bid, target in zip(
        ids,
        [
            BatchState.SENT,
            BatchState.SENT,
            BatchState.FAILED,
            BatchState.UNKNOWN,
            BatchState.HALTED,
            BatchState.STAGED,
        ],
        strict=True,
    ):
        drive_to(outbox, run_key, bid, target)

    counts = outbox.counts(run_key)

    assert set(counts) == set(BatchState)
    assert counts == {
        BatchState.STAGED: {"batches": 1, "recipients": 3},
        BatchState.SENDING: {"batches": 0, "recipients": 0},
        BatchState.SENT: {"batches": 2, "recipients": 6},
        BatchState.FAILED: {"batches": 1, "recipients": 3},
        BatchState.UNKNOWN: {"batches": 1, "recipients": 3},
        BatchState.HALTED: {"batches": 1, "recipients": 3},
    }
    assert outbox.counts("winter_update/no-such-run") == {
        s: {"batches": 0, "recipients": 0} for s in BatchState
    }


def test_not_sent_lists_every_recipient_of_an_unsent_batch_with_its_reason(
    outbox: Outbox, run_key: str
) -> None:
    ids = stage(outbox, run_key, 4, recipients=2)
    for bid, target in zip(
        ids,
        [BatchState.FAILED, BatchState.SENT, BatchState.UNKNOWN, BatchState.STAGED],
        strict=True,
    ):
        drive_to(outbox, run_key, bid, target)
    stage(outbox, f"{run_key}-other", 1)

    rows = list(outbox.not_sent(run_key))

    assert [(r["batch_id"], r["state"]) for r in rows] == [
        (ids[0], BatchState.FAILED),
        (ids[0], BatchState.FAILED),
        (ids[2], BatchState.UNKNOWN),
        (ids[2], BatchState.UNKNOWN),
        (ids[3], BatchState.STAGED),
        (ids[3], BatchState.STAGED),
    ]
    assert {r["email_key"] for r in rows[:2]} == {"user0.0@example.com", "user0.1@example.com"}
    assert {r["user_id"] for r in rows[2:4]} == {"u2-0", "u2-1"}
    assert rows[0]["last_error"] == "ended failed"
    assert rows[4]["last_error"] is None
    assert not any(r["batch_id"] == ids[1] for r in rows)


# -- one message per recipient (SMTP) -------------------------------------------------------------


def test_a_chunk_of_recipients_is_begun_and_recorded_in_one_transaction_each(
    outbox: Outbox, run_key: str
) -> None:
    """On both databases: a chunk moves to 'sending' at once (only the free ones: any one
    already taken is not returned), its outcomes are recorded at once (a Message-ID, an error,
    or back to not sent), a recipient that was not 'sending' is a conflict reported after the
    others are recorded, and a worker that dies with a chunk begun leaves exactly that chunk
    'unknown'."""
    [first, second] = stage(outbox, run_key, 2, recipients=4)
    a, b = ([m[0].lower() for m in members_of([batch(i, 4)])] for i in range(2))
    assert outbox.claim(run_key, first)
    assert outbox.begin_recipients(run_key, first, [a[0].upper(), a[1], a[2]]) == set(a[:3])
    assert outbox.begin_recipients(run_key, first, [a[2], a[3]]) == {a[3]}
    with pytest.raises(OutboxConflict, match=r"1 recipient\(s\) of batch"):
        outbox.finish_recipients(
            run_key,
            first,
            [
                RecipientOutcome(a[0], BatchState.SENT, message_id="<a0@x>"),
                RecipientOutcome(a[1], BatchState.FAILED, error="550 no such user"),
                RecipientOutcome(a[2], None, error="451 later"),
                RecipientOutcome(b[0], BatchState.SENT),  # another batch's: not 'sending' here
            ],
        )
    records = outbox.recipient_states(run_key, first)
    assert (records[a[0]].state, records[a[0]].message_id) == (BatchState.SENT, "<a0@x>")
    assert (records[a[1]].state, records[a[1]].last_error) == (
        BatchState.FAILED,
        "550 no such user",
    )
    assert (records[a[2]].state, records[a[2]].last_error) == (None, "451 later")
    assert records[a[3]].state == BatchState.SENDING
    with pytest.raises(ValueError, match="not a final recipient state"):
        outbox.finish_recipients(run_key, first, [RecipientOutcome(a[3], BatchState.STAGED)])

    # The second batch: its worker dies with a chunk of three begun, one recorded.
    assert outbox.claim(run_key, second)
    assert outbox.begin_recipients(run_key, second, b[:3]) == set(b[:3])
    outbox.finish_recipients(run_key, second, [RecipientOutcome(b[0], BatchState.SENT)])
    assert outbox.mark_interrupted(run_key, [second]) == 1
    assert outbox.recipient_outcomes(run_key, second) == {
        b[0]: BatchState.SENT,
        b[1]: BatchState.UNKNOWN,
        b[2]: BatchState.UNKNOWN,
    }
    assert outbox.unsent_recipients(run_key, second) == [b[3]]


def test_per_recipient_states_drive_counts_not_sent_requeue_and_interruption(
    outbox: Outbox, run_key: str
) -> None:
    ids = stage(outbox, run_key, 2, recipients=3)
    first, second = ids
    a, b = ([m[0].lower() for m in members_of([batch(i, 3)])] for i in range(2))
    # First batch: sent one by one, one refused, one answer lost; the batch ends 'unknown'.
    assert outbox.claim(run_key, first)
    for email, state in zip(
        a, [BatchState.SENT, BatchState.FAILED, BatchState.UNKNOWN], strict=True
    ):
        assert outbox.mark_recipient(run_key, first, email, BatchState.SENDING)
        assert not outbox.mark_recipient(run_key, first, email, BatchState.SENDING)
        assert outbox.mark_recipient(run_key, first, email, state, error=f"ended {state}")
    outbox.finish(run_key, first, BatchState.UNKNOWN, error="1 of 3 lost")
    # Second batch: the worker dies while sending its second message.
    assert outbox.claim(run_key, second)
    assert outbox.mark_recipient(run_key, second, b[0], BatchState.SENDING)
    assert outbox.mark_recipient(run_key, second, b[0], BatchState.SENT, message_id="<b0@x>")
    assert outbox.mark_recipient(run_key, second, b[1], BatchState.SENDING)

    assert outbox.mark_interrupted(run_key, ids) == 1

    assert state_of(outbox, run_key) == {first: BatchState.UNKNOWN, second: BatchState.STAGED}
    assert outbox.recipient_outcomes(run_key, second) == {
        b[0]: BatchState.SENT,
        b[1]: BatchState.UNKNOWN,
    }
    assert outbox.unsent_recipients(run_key, second) == [b[2]]
    counts = outbox.counts(run_key)
    assert {s: c["recipients"] for s, c in counts.items()} == {
        BatchState.STAGED: 1,
        BatchState.SENDING: 0,
        BatchState.SENT: 2,
        BatchState.FAILED: 1,
        BatchState.UNKNOWN: 2,
        BatchState.HALTED: 0,
    }
    assert counts[BatchState.UNKNOWN]["batches"] == 1
    assert counts[BatchState.STAGED]["batches"] == 1
    rows = {r["email_key"]: (r["state"], r["last_error"]) for r in outbox.not_sent(run_key)}
    assert rows == {
        a[1]: (BatchState.FAILED, "ended failed"),
        a[2]: (BatchState.UNKNOWN, "ended unknown"),
        b[1]: (BatchState.UNKNOWN, rows[b[1]][1]),
        b[2]: (BatchState.STAGED, rows[b[2]][1]),
    }
    assert "interrupted while this message" in (rows[b[1]][1] or "")
    with pytest.raises(OutboxConflict):
        outbox.stage(
            run_key, "m" * 64, [batch(0, 3), batch(1, 3)], members_of([batch(0, 3), batch(1, 3)])
        )

    # Resending the unknown ones: only those recipients become sendable again.
    assert outbox.requeue(run_key, [BatchState.UNKNOWN]) == 1
    assert state_of(outbox, run_key) == {first: BatchState.STAGED, second: BatchState.STAGED}
    assert outbox.recipient_outcomes(run_key, first) == {
        a[0]: BatchState.SENT,
        a[1]: BatchState.FAILED,
    }
    assert outbox.recipient_outcomes(run_key, second) == {b[0]: BatchState.SENT}
    assert outbox.counts(run_key)[BatchState.STAGED]["recipients"] == 3


def test_settling_changes_only_the_unknown_outcomes_of_the_named_requests(
    outbox: Outbox, run_key: str
) -> None:
    """A message recorded sent or failed stays so; the unknown one is settled as the operator
    found it at the provider, and the decision is on record with the counts around it."""
    ids = stage(outbox, run_key, 3, recipients=3)
    first, second, third = ids
    a, b = ([m[0].lower() for m in members_of([batch(i, 3)])] for i in range(2))
    assert outbox.claim(run_key, first)
    for email, state in zip(
        a, [BatchState.SENT, BatchState.FAILED, BatchState.UNKNOWN], strict=True
    ):
        assert outbox.mark_recipient(run_key, first, email, BatchState.SENDING)
        assert outbox.mark_recipient(run_key, first, email, state)
    outbox.finish(run_key, first, BatchState.UNKNOWN, error="1 of 3 lost")
    assert outbox.claim(run_key, second)
    outbox.finish(run_key, second, BatchState.UNKNOWN, error="answer lost")
    drive_to(outbox, run_key, third, BatchState.SENT)

    settled = outbox.settle(
        run_key, [first], OperatorAction(Action.SETTLE_SENT, "olga", "delivered per SendGrid")
    )
    assert settled == 1
    assert state_of(outbox, run_key)[first] == BatchState.SENT
    assert outbox.recipient_outcomes(run_key, first) == {
        a[0]: BatchState.SENT,
        a[1]: BatchState.FAILED,
        a[2]: BatchState.SENT,
    }
    assert outbox.settle(
        run_key, [second], OperatorAction(Action.SETTLE_NOT_SENT, "olga", "no record")
    ) == len(b)
    assert state_of(outbox, run_key) == {
        first: BatchState.SENT,
        second: BatchState.STAGED,
        third: BatchState.SENT,
    }
    with pytest.raises(NothingToSettle, match=f"{third}: nothing unknown in it"):
        outbox.settle(run_key, [third], OperatorAction(Action.SETTLE_SENT, "olga", "again"))
    with pytest.raises(ValueError, match="needs a reason"):
        OperatorAction(Action.SETTLE_SENT, "olga", "  ")

    history = outbox.actions(run_key)
    assert [(h["action"], h["requests"], h["recipients"]) for h in history] == [
        ("settle_sent", [first], 1),
        ("settle_not_sent", [second], 3),
    ]
    assert history[0]["counts_before"]["unknown"]["recipients"] == 4
    assert history[1]["counts_after"]["unknown"]["recipients"] == 0
    assert history[1]["counts_after"]["staged"]["recipients"] == 3


@pytest.mark.postgres
def test_postgres_plans_claims_with_statistics_that_count_the_staged_run(
    postgres_url: str, run_key: str
) -> None:
    """Staging a run takes the tables' statistics again: planned with the statistics of the
    tables before a million recipients were staged, each claim scanned them (0.15 s a claim)."""
    import sqlalchemy as sa

    box = Outbox(postgres_url)
    try:
        with box.engine.connect() as conn:
            before = conn.execute(sa.text("SELECT now()")).scalar_one()
        staged = [batch(i, recipients=3) for i in range(4)]
        box.stage(run_key, "m" * 64, staged, members_of(staged))
        with box.engine.connect() as conn:
            analysed = dict(
                conn.execute(
                    sa.text(
                        "SELECT relname, last_analyze FROM pg_stat_user_tables "
                        "WHERE relname IN ('mailroom_recipients', 'mailroom_batches')"
                    )
                ).all()
            )
    finally:
        box.dispose()
    assert set(analysed) == {"mailroom_recipients", "mailroom_batches"}
    assert all(when is not None and when >= before for when in analysed.values())
