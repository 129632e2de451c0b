"""The Airflow Variable ``mailroom_unsubscribe_secret`` holds the list of
``MAILROOM_UNSUBSCRIBE_SECRETS`` (newest first): the DAG signs with the newest, so one list
pasted into both keeps the links the DAG makes verifiable by the feedback service."""

from __future__ import annotations

import pytest

from mailroom.errors import MailroomError
from mailroom.unsubscribe import UnsubscribeKeys, key_id, unsubscribe_token

pytestmark = pytest.mark.dag

VARIABLE = "AIRFLOW_VAR_MAILROOM_UNSUBSCRIBE_SECRET"
NEW, OLD = "variable-newest-secret", "variable-older-secret"


@pytest.mark.parametrize("value", [NEW, f" {NEW} ", f"{NEW},{OLD}", f"{NEW}\n{OLD}\n", f",{NEW},"])
def test_the_dag_signs_with_the_newest_secret_of_the_list(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from mailroom_airflow import settings

    monkeypatch.setenv(VARIABLE, value)
    assert settings.unsubscribe_secret() == NEW.encode()
    token = unsubscribe_token(settings.unsubscribe_secret(), "winter_update", "u1")
    assert UnsubscribeKeys.parse(value).verify(token) == ("winter_update", "u1")


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (
            ", ,",
            "Airflow Variable 'mailroom_unsubscribe_secret': no unsubscribe secret: give at "
            "least one (newest first, separated by commas or line breaks)",
        ),
        (
            f"{NEW},{OLD},{NEW}",
            "Airflow Variable 'mailroom_unsubscribe_secret': unsubscribe secrets 1 and 3 of the "
            f"list are the same secret (key id {key_id(NEW.encode())}): give each secret once",
        ),
    ],
)
def test_a_list_without_a_usable_secret_is_refused_without_showing_one(
    monkeypatch: pytest.MonkeyPatch, value: str, error: str
) -> None:
    from mailroom_airflow import settings

    monkeypatch.setenv(VARIABLE, value)
    with pytest.raises(MailroomError) as refused:
        settings.unsubscribe_secret()
    assert str(refused.value) == error
    assert NEW not in str(refused.value)
