"""validate_audience: the Great Expectations suite on the audience snapshot.

GX itself names the failing rows (by user id); those rows go to the quarantine file with the
expectation that caught them as the reason. Above the campaign's threshold the run fails.

A row whose template field shows another audience member's address (a first name holding a
batch-mate's address) is quarantined here, with that reason: sent, it would show one person's
address to another, and the guard would refuse its whole batch after approval and halt the run.
"Shows" is ``addresses.addresses_shown``, the reading of a person (markup, entities,
%-encoding, invisible characters, fullwidth forms and "(at)"/"(dot)" spellings undone, IDN
domains in either form), compared by ``address_key`` with the key of every extracted person.
A field showing the row's own address, or one of the campaign's own public addresses (sender,
reply-to, unsubscribe mailbox, which every recipient sees in the message anyway, even when
staff are on the list), is no danger and goes out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from mailroom.addresses import SINGLE_ADDRESS_PATTERN, addresses_shown
from mailroom.audience.extract import address_keys
from mailroom.campaign_spec import CampaignSpec
from mailroom.checks.limits import MAX_SUBSTITUTIONS_BYTES
from mailroom.envelopes import substitutions_fit
from mailroom.errors import ValidationFailed
from mailroom.gx_runtime import summarise, validate_frame

log = logging.getLogger(__name__)

SEPARATORS_PATTERN = r"[,;\s<>\"]"


@dataclass(frozen=True)
class AudienceValidation:
    total: int
    valid: int
    quarantined: int
    quarantined_by_reason: dict[str, int]
    per_locale: dict[str, int]
    gx: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "valid": self.valid,
            "quarantined": self.quarantined,
            "quarantined_by_reason": self.quarantined_by_reason,
            "per_locale": self.per_locale,
            "gx": self.gx,
        }


def audience_expectations(spec: CampaignSpec) -> list[Any]:
    import great_expectations.expectations as gxe

    expectations: list[Any] = [
        gxe.ExpectColumnValuesToNotBeNull(column="user_id"),
        gxe.ExpectColumnValuesToBeUnique(column="user_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="email"),
        gxe.ExpectColumnValuesToNotMatchRegex(column="email", regex=SEPARATORS_PATTERN),
        gxe.ExpectColumnValuesToMatchRegex(column="email", regex=SINGLE_ADDRESS_PATTERN),
        gxe.ExpectColumnValuesToBeUnique(column="email_key"),
        gxe.ExpectColumnValuesToBeInSet(column="locale", value_set=list(spec.locales)),
    ]
    for field in spec.fields:
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=field))
        # Within the campaign's cap (``max_field_length``): a 100 KB first name would go into
        # every part of the message it is shown in.
        expectations.append(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=field, min_value=1, max_value=spec.max_field_length
            )
        )
        # A control character (a line break, NUL, ESC…) in a value every message carries could
        # forge a header line or cut the text where a reader or a server stops: quarantined with
        # its reason here, before approval, never refused by the guard after it.
        expectations.append(
            gxe.ExpectColumnValuesToNotMatchRegex(column=field, regex=CONTROL_CHARACTERS)
        )
        # Something a reader sees: "   " (or only invisible characters) would be sent as an
        # empty value ("Hi ,"), as an empty value would, which the length check refuses.
        expectations.append(gxe.ExpectColumnValuesToMatchRegex(column=field, regex=VISIBLE))
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(column=_shows_another(field), value_set=[False])
        )
    # SendGrid refuses a personalization whose substitutions exceed its limit, and with it the
    # whole request: the row's substitutions as ``build_envelopes`` will make them must fit.
    expectations.append(gxe.ExpectColumnValuesToBeInSet(column=SUBSTITUTIONS_FIT, value_set=[True]))
    return expectations


SUBSTITUTIONS_FIT = "substitutions_fit"


# Control characters, and U+FFFD: what the extract made of bytes that were not UTF-8.
CONTROL_CHARACTERS = r"[\x00-\x08\x0a-\x1f\x7f\u2028\u2029\ufffd]"
VISIBLE = r"[^\s\u00ad\u200b-\u200f\u2060-\u2064\ufeff]"


def _shows_another(field: str) -> str:
    return f"{field}__shows_another_address"


# A value that may show an address as ``addresses_shown`` reads one: an "@" or what may be
# decoded into one ("&", "%"), markup, a spelt-out "at", or any non-ASCII character (a fullwidth
# "＠", an invisible character). Others (most first names) are not read one by one.
_MAY_SHOW_AN_ADDRESS = r"[@&%<]|[^\x00-\x7f]|(?i:(?<![a-z0-9])at(?![a-z0-9]))"


def _shows_another_address(
    values: pd.Series, own: pd.Series, everyone: set[str], public: frozenset[str]
) -> pd.Series:
    """For each row: whether its value shows an audience address other than the row's own and
    the campaign's public ones."""
    text = values.astype("string[pyarrow]")
    maybe = text.str.contains(_MAY_SHOW_AN_ADDRESS, regex=True).fillna(False).astype(bool)
    rows = maybe[maybe].index
    shows = pd.Series(
        [
            bool((addresses_shown(str(value)) & everyone) - public - {mine})
            for value, mine in zip(values.loc[rows], own.loc[rows], strict=True)
        ],
        index=rows,
        dtype=bool,
    )
    return shows.reindex(values.index, fill_value=False)


def validate_audience(
    spec: CampaignSpec,
    *,
    snapshot: Path,
    valid_out: Path,
    quarantine_out: Path,
    suppressed: Path | None = None,
) -> AudienceValidation:
    """``suppressed``: the extract's suppressed people. A value showing one of their addresses
    is quarantined too: they are audience members (and the gate holds them to it)."""
    frame = pd.read_parquet(snapshot)
    # A user id of blanks is no id (its unsubscribe token would name nobody): missing.
    blank = frame["user_id"].astype("string").str.strip().eq("").fillna(False).astype(bool)
    frame["user_id"] = frame["user_id"].astype(object).where(~blank, None)
    frame["email_key"] = address_keys(frame["email"])
    everyone = set(frame["email_key"].dropna())
    if suppressed is not None and suppressed.exists():
        everyone |= set(
            address_keys(pd.read_parquet(suppressed, columns=["email"])["email"]).dropna()
        )
    public = spec.public_addresses
    for field in spec.fields:
        frame[_shows_another(field)] = _shows_another_address(
            frame[field], frame["email_key"], everyone, public
        )
    frame[SUBSTITUTIONS_FIT] = substitutions_fit(
        spec,
        pa.Table.from_pandas(
            frame[list(dict.fromkeys(["user_id", *spec.fields]))], preserve_index=False
        ),
        MAX_SUBSTITUTIONS_BYTES,
    ).to_numpy(zero_copy_only=False)
    derived = ["email_key", SUBSTITUTIONS_FIT, *(_shows_another(f) for f in spec.fields)]
    result = validate_frame(
        frame,
        suite_name="audience",
        expectations=audience_expectations(spec),
        index_columns=["user_id"],
    )
    reasons = _reasons_by_user(result)
    bad = frame["user_id"].isin(reasons.keys()) | frame["user_id"].isna()
    quarantine = frame[bad].drop(columns=derived).copy()
    quarantine["reason"] = [
        reasons.get(uid, "user_id missing") if isinstance(uid, str) else "user_id missing"
        for uid in quarantine["user_id"]
    ]
    valid = frame[~bad].drop(columns=derived)
    valid.to_parquet(valid_out, index=False)
    quarantine.to_parquet(quarantine_out, index=False)

    outcome = AudienceValidation(
        total=len(frame),
        valid=len(valid),
        quarantined=len(quarantine),
        quarantined_by_reason=quarantine["reason"].value_counts().sort_index().to_dict(),
        per_locale=valid["locale"].value_counts().sort_index().to_dict(),
        gx=summarise(result),
    )
    log.info(
        "validate: %d rows, %d valid, %d quarantined %s",
        outcome.total,
        outcome.valid,
        outcome.quarantined,
        outcome.quarantined_by_reason,
    )
    fraction = outcome.quarantined / outcome.total if outcome.total else 0.0
    if outcome.total == 0:
        raise ValidationFailed("the audience is empty: nothing to send")
    if fraction > spec.max_invalid_fraction:
        raise ValidationFailed(
            f"{outcome.quarantined} of {outcome.total} recipients ({fraction:.1%}) failed "
            f"validation, above the campaign's limit of {spec.max_invalid_fraction:.1%}: "
            f"{outcome.quarantined_by_reason}"
        )
    return outcome


def _reasons_by_user(result: Any) -> dict[str, str]:
    """user_id → the first expectation that failed for it (uniqueness names every copy)."""
    reasons: dict[str, str] = {}
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        reason = f"{config.type}({config.kwargs.get('column')})"
        for row in item.result.get("unexpected_index_list") or ():
            uid = row.get("user_id")
            if isinstance(uid, str):
                reasons.setdefault(uid, reason)
    return reasons
