"""The transport interface. ``send`` always runs the envelope guard; subclasses only deliver.

A transport that sends one message per recipient (SMTP) says so with
``delivers_per_recipient = True``; ``send`` then hands it a ``RecipientLedger`` as well, where it
records each recipient's outcome as it goes, so a failure in the middle of a batch leaves the
messages already sent on record and a retry or resume skips them.

Such a transport makes something of its own from a guarded body (one message per recipient),
and that is what leaves; ``preflight`` is where it builds and checks all of it before anything
leaves, so ``send_shard`` can clear a whole shard's messages before its first one goes.

The guard runs in full once per request, in the ``guard_shard`` pass, which records each body's
SHA-256 in the outbox as it clears it. ``send_shard`` then hands ``send`` that record for the
batch it sends (``Clearance.read``); ``send`` hashes the bytes it is given and skips parsing them
again only when that digest is the one the pass cleared for that batch and is in the approved
manifest: the same bytes, so the same verdict. Bytes with another digest are refused; without
a clearance (the canary, a caller outside ``send_shard``) the full guard runs, as before.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mailroom.checks.envelope_guard import ApprovedManifest, GuardedBody, check_envelope
from mailroom.delivery.outbox import BatchState, Outbox, RecipientOutcome
from mailroom.errors import EnvelopeViolation


@dataclass(frozen=True)
class Delivery:
    """The provider's acceptance of one request."""

    message_id: str
    status: int


@dataclass(frozen=True)
class Clearance:
    """What the envelope guard's pass (``guard_shard``) recorded in the outbox for one batch:
    the SHA-256 of the exact body it parsed and cleared (``guarded_sha256``, recorded only when
    it is the digest the batch was staged with)."""

    batch_id: str
    sha256: str

    @staticmethod
    def read(outbox: Outbox, run_key: str) -> dict[str, Clearance]:
        """Every batch of the run the pass cleared: batch id → its clearance."""
        return {
            batch_id: Clearance(batch_id, digest)
            for batch_id, digest in outbox.guarded_digests(run_key).items()
        }


class RecipientLedger(Protocol):
    """Where a per-recipient transport records the messages of one batch, a chunk at a time.

    A recipient's states are its batch's (``BatchState``): ``sending → sent | failed |
    unknown``. Addresses are compared lower-cased. A message may only leave after ``begin``
    returned its recipient, so a worker killed at any point leaves that recipient ``sending``
    (then ``unknown``), never unrecorded: at most the one chunk in flight is in doubt.
    """

    def settled(self) -> Mapping[str, BatchState]:
        """Recipients of the batch with an outcome already (sent, failed, unknown, or a message
        in flight): lower-cased address → state. They must not be sent again."""
        ...

    def begin(self, emails: Sequence[str]) -> set[str]:
        """Mark a chunk of recipients ``sending`` at once; returns the lower-cased addresses
        that were free to send (only those may be sent)."""
        ...

    def finish(self, outcomes: Sequence[RecipientOutcome]) -> None:
        """A chunk's outcomes at once: ``sending → sent | failed | unknown``, or back to not
        sent (state None) when the message certainly did not leave (a 4xx, a refused
        connection): a later attempt may send it."""
        ...

    def stop_reason(self) -> str | None:
        """Why to stop before the next chunk (a halt), or None to go on."""
        ...


@dataclass
class MemoryLedger:
    """A ledger kept in memory, for a transport used without an outbox."""

    states: dict[str, BatchState] = field(default_factory=dict)
    message_ids: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def settled(self) -> Mapping[str, BatchState]:
        return dict(self.states)

    def begin(self, emails: Sequence[str]) -> set[str]:
        begun = set()
        for email in emails:
            key = email.lower()
            if key not in self.states:
                self.states[key] = BatchState.SENDING
                begun.add(key)
        return begun

    def finish(self, outcomes: Sequence[RecipientOutcome]) -> None:
        for outcome in outcomes:
            key = outcome.email.lower()
            if self.states.get(key) != BatchState.SENDING:
                raise ValueError(f"recipient {key!r} is not sending")
            if outcome.state is None:
                del self.states[key]
            else:
                self.states[key] = outcome.state
            if outcome.message_id is not None:
                self.message_ids[key] = outcome.message_id
            if outcome.error is not None:
                self.errors[key] = outcome.error

    def stop_reason(self) -> str | None:
        return None


class Transport(ABC):
    name: str = "abstract"
    # True: one message per recipient, each recorded through a RecipientLedger.
    delivers_per_recipient: bool = False
    # How many requests ``send`` may carry at once, each from a thread of its own (a shard's
    # window of requests in flight); 1: one at a time, from one thread.
    max_in_flight: int = 1
    # A per-recipient transport's own window: how many messages it may have in flight at once,
    # each over a connection of its own (``send_shard`` sets it from the campaign's
    # ``max_in_flight``, at most ``max_in_flight`` above).
    in_flight: int = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("send", "guard"):
            if name in cls.__dict__:
                raise TypeError(
                    f"{cls.__name__} must not override {name}(): it is where the guard runs"
                )

    def send(
        self,
        body: bytes,
        approved: ApprovedManifest,
        expected_recipients: Collection[str] | None = None,
        ledger: RecipientLedger | None = None,
        *,
        cleared: Clearance | None = None,
    ) -> Delivery:
        """Guard the exact bytes (``guard``), then deliver them; raises on anything but
        success.

        ``ledger`` (per-recipient transports only): where each recipient's outcome is recorded,
        and which recipients of the batch already have one and are skipped.
        """
        if ledger is not None and not self.delivers_per_recipient:
            raise ValueError(f"the {self.name} transport sends whole requests: no ledger")
        guarded = self.guard(body, approved, expected_recipients, cleared)
        if self.delivers_per_recipient:
            return self._deliver_each(guarded, ledger if ledger is not None else MemoryLedger())
        return self._deliver(guarded)

    def guard(
        self,
        body: bytes,
        approved: ApprovedManifest,
        expected_recipients: Collection[str] | None = None,
        cleared: Clearance | None = None,
    ) -> GuardedBody:
        """The envelope guard's verdict on these exact bytes.

        ``cleared``: what the guard's pass recorded in the outbox for the batch. When the
        SHA-256 of ``body`` is that digest and in the approved manifest, these are the bytes the
        pass parsed and cleared (against this batch's recipients and values), and they are not
        parsed again (``recipients`` is then empty: the body's own personalizations are the
        cleared ones); another digest is refused (``EnvelopeViolation``: the bytes changed after
        the pass); without a clearance the full guard runs on them here.
        """
        guarded = _cleared(body, approved, cleared)
        if guarded is None:
            guarded = check_envelope(body, approved, expected_recipients)
        return guarded

    def preflight(self, guarded: GuardedBody) -> None:  # noqa: B027 - whole requests: nothing
        """Build and check everything this transport would make of ``guarded``, send nothing;
        raise ``EnvelopeViolation`` where ``send`` would refuse.

        The default does nothing: a whole-request transport sends the guarded bytes themselves,
        which the envelope guard has just checked. A per-recipient transport builds and checks
        every message of the body here (and keeps none of them), so ``send_shard`` can run it on
        every batch of its shard before the shard's first message leaves.
        """

    @abstractmethod
    def _deliver(self, guarded: GuardedBody) -> Delivery:
        """Hand guarded bytes to the provider unchanged; raise TransportError on failure.
        (``guarded.recipients`` is empty for bytes the guard's pass cleared: send the bytes.)"""

    def _deliver_each(self, guarded: GuardedBody, ledger: RecipientLedger) -> Delivery:
        """Per-recipient transports: send one message per recipient not yet settled in
        ``ledger``, recording each outcome there."""
        raise NotImplementedError(f"the {self.name} transport does not deliver per recipient")

    def close(self) -> None:  # noqa: B027 - most transports hold nothing to release
        """Release connections; the default holds none."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cleared(
    body: bytes, approved: ApprovedManifest, cleared: Clearance | None
) -> GuardedBody | None:
    """``body`` as the guard's pass cleared it; None when the full guard must run on it (no
    clearance, or a digest outside the approved manifest); refused when it is not the body the
    pass cleared for the batch (changed since, or another batch's).

    Nothing of it is read again, not even its recipients (``recipients`` is empty: the pass
    checked them against the outbox's for this batch, and the caller's are not read): whole-
    request transports send the bytes themselves, a per-recipient transport reads the
    personalizations of the body it parses to build its messages.
    """
    if cleared is None:
        return None
    digest = hashlib.sha256(body).hexdigest()
    if digest != cleared.sha256:
        if digest not in approved.digests:
            raise EnvelopeViolation(
                f"request {digest[:12]}… is not in the approved manifest {approved.sha256[:12]}… "
                f"(nor the body the envelope guard's pass cleared for batch {cleared.batch_id}: "
                "it changed after the pass)"
            )
        raise EnvelopeViolation(
            f"request {digest[:12]}… is not the body the envelope guard's pass cleared for batch "
            f"{cleared.batch_id} ({cleared.sha256[:12]}…): another approved request"
        )
    if digest not in approved.digests:
        return None
    return GuardedBody(body=body, sha256=digest, recipients=())
