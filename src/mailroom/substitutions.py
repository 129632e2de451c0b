"""Substitution tags: the per-recipient holes left in content rendered once per locale.

Content is rendered once per locale; every per-recipient value stays a tag that the provider
fills from the recipient's own personalization. A field has two tags: the HTML one carries the
HTML-escaped value, the plain one the raw value (for the subject and the text part).
"""

import functools
import re
from collections.abc import Mapping

TAG_PATTERN = re.compile(r"%%([A-Za-z_][A-Za-z0-9_]*)(\|html)?%%")
# Anything that looks like a tag or a Jinja marker, even a malformed one, is suspect in output.
LEFTOVER_MARKER = re.compile(r"%%|\{\{|\}\}|\{%|%\}|\{#|#\}")

UNSUBSCRIBE_FIELD = "unsubscribe_url"


def substitution_tag(field: str, *, html: bool) -> str:
    """The tag that stands for ``field`` in the HTML part (``html=True``) or elsewhere."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", field):
        raise ValueError(f"not a valid substitution field name: {field!r}")
    return f"%%{field}|html%%" if html else f"%%{field}%%"


def tags_in(text: str) -> set[str]:
    """Every substitution tag that occurs in ``text``."""
    return {m.group(0) for m in TAG_PATTERN.finditer(text)}


def apply_substitutions(text: str, substitutions: Mapping[str, str]) -> str:
    """``text`` with each substitution key replaced by its value, in one pass.

    One pass (longest key first at each position) means a value that happens to contain another
    key is delivered literally rather than substituted again, so a recipient's own data can never
    pull in another field; a leftover tag in the output is then visible to whoever checks it.
    """
    if not substitutions:
        return text
    pattern = _pattern_for(tuple(substitutions))
    return pattern.sub(lambda match: substitutions[match.group(0)], text)


@functools.lru_cache(maxsize=256)
def _pattern_for(keys: tuple[str, ...]) -> re.Pattern[str]:
    """The one-pass pattern for these keys, longest first (every personalization of a run has
    the same keys: made once)."""
    ordered = sorted(keys, key=len, reverse=True)
    return re.compile("|".join(re.escape(key) for key in ordered if key))
