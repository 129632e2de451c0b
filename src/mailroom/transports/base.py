"""The transport interface. ``send`` always runs the envelope guard; subclasses only deliver."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from mailroom.envelope_guard import ApprovedManifest, GuardedBody, check_envelope


@dataclass(frozen=True)
class Delivery:
    """The provider's acceptance of one request."""

    message_id: str
    status: int


class Transport(ABC):
    name: str = "abstract"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "send" in cls.__dict__:
            raise TypeError(f"{cls.__name__} must not override send(): it is where the guard runs")

    def send(
        self,
        body: bytes,
        approved: ApprovedManifest,
        expected_recipients: Collection[str] | None = None,
    ) -> Delivery:
        """Guard the exact bytes, then deliver them; raises on anything but success."""
        return self._deliver(check_envelope(body, approved, expected_recipients))

    @abstractmethod
    def _deliver(self, guarded: GuardedBody) -> Delivery:
        """Hand guarded bytes to the provider unchanged; raise TransportError on failure."""

    def close(self) -> None:  # noqa: B027 - most transports hold nothing to release
        """Release connections; the default holds none."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
