"""The names other tools drive runs through stay importable where they always were."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_transports_are_importable_from_mailroom_transports() -> None:
    from mailroom import transports
    from mailroom.delivery.transports.base import Transport
    from mailroom.delivery.transports.sendgrid import SendGridTransport
    from mailroom.delivery.transports.smtp import SmtpTransport

    assert transports.SendGridTransport is SendGridTransport
    assert transports.SmtpTransport is SmtpTransport
    assert issubclass(transports.FileTransport, Transport)
    assert {"SendGridSettings", "SmtpSettings"} <= set(transports.__all__)


def test_the_pipeline_keeps_its_run_types() -> None:
    from mailroom import pipeline
    from mailroom.run import ProjectPaths, Run

    assert (pipeline.Run, pipeline.ProjectPaths) == (Run, ProjectPaths)
