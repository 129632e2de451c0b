"""One personalization of an accepted request, rendered as its recipients would receive it."""

from typing import Any

from mailroom.substitutions import apply_substitutions
from sendgrid_dev.store import AcceptedRecord

__all__ = ["apply_substitutions", "render_personalization"]


def _first_content(content: list[dict[str, Any]], content_type: str) -> str | None:
    for block in content:
        if str(block.get("type", "")).lower() == content_type:
            value = block.get("value")
            return value if isinstance(value, str) else None
    return None


def render_personalization(record: AcceptedRecord, index: int) -> dict[str, Any]:
    """What the recipients of personalization ``index`` get; raises IndexError if there is none."""
    body = record["body"]
    personalizations = body["personalizations"]
    if not 0 <= index < len(personalizations):
        raise IndexError(index)
    personalization = personalizations[index]
    substitutions = personalization.get("substitutions") or {}
    content = body.get("content") or []

    def render(text: str | None) -> str | None:
        return None if text is None else apply_substitutions(text, substitutions)

    return {
        "message_id": record["message_id"],
        "personalization_index": index,
        "from": personalization.get("from") or body.get("from"),
        "reply_to": body.get("reply_to"),
        "to": personalization.get("to", []),
        "cc": personalization.get("cc", []),
        "bcc": personalization.get("bcc", []),
        "subject": render(personalization.get("subject") or body.get("subject")),
        "text": render(_first_content(content, "text/plain")),
        "html": render(_first_content(content, "text/html")),
        "headers": {**(body.get("headers") or {}), **(personalization.get("headers") or {})},
        "custom_args": {
            **(body.get("custom_args") or {}),
            **(personalization.get("custom_args") or {}),
        },
        "categories": body.get("categories", []),
        "template_id": body.get("template_id"),
    }
