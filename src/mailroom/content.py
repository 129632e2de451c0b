"""render_content: a campaign template rendered once per locale, never per recipient.

Every per-recipient value stays a substitution tag (see ``substitutions``) that the provider
fills from the recipient's own personalization, so one render per locale serves the whole
audience and the content can be approved once. Translations come from the gettext catalog
``<translations_dir>/<locale>/LC_MESSAGES/messages.po``, compiled in memory at render time so a
stale ``.mo`` file can never be what ships.

This module must not import Airflow: the task wrapper that calls it does.
"""

from __future__ import annotations

import gettext
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any

import css_inline
from babel import Locale, UnknownLocaleError
from babel.messages.catalog import Catalog, Message
from babel.messages.mofile import write_mo
from babel.messages.pofile import PoFileError, PoFileParser
from babel.support import Translations
from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    UndefinedError,
    select_autoescape,
)
from markupsafe import Markup

from mailroom.campaign_spec import TEMPLATE_PATTERN, CampaignSpec
from mailroom.errors import ContentError
from mailroom.substitutions import (
    LEFTOVER_MARKER,
    TAG_PATTERN,
    UNSUBSCRIBE_FIELD,
    substitution_tag,
    tags_in,
)

__all__ = ["LocaleContent", "render_content", "render_locale"]

SUBJECT_TEMPLATE = "subject.txt"
HTML_TEMPLATE = "body.html"
TEXT_TEMPLATE = "body.txt"
CATALOG_DOMAIN = "messages"

# Both names end up in file paths; anything else could climb out of the configured directories.
_TEMPLATE_NAME = TEMPLATE_PATTERN
_LOCALE_NAME = re.compile(r"[A-Za-z]{2,3}(?:[_-][A-Za-z0-9]{2,8})*")
_STYLE_ELEMENT = re.compile(r"(<style\b[^>]*>)(.*?)(</style\s*>)", re.IGNORECASE | re.DOTALL)
# CSS legitimately contains "}}", "{#" and "%}" (nested @media blocks, id selectors, "100%}"),
# so inside <style> only the openers that CSS never produces count as Jinja leftovers.
_STYLE_LEFTOVER = re.compile(r"\{\{|\{%")
_TAG_TOKEN = "mailroomtag{index}x"
_TAG_TOKEN_PREFIX = "mailroomtag"

# keep_at_rules leaves @media rules in a <style> block since they cannot be inlined;
# remote stylesheets are never fetched: rendering must not depend on the network.
_INLINER = css_inline.CSSInliner(keep_at_rules=True, load_remote_stylesheets=False)


@dataclass(frozen=True)
class LocaleContent:
    """The rendered message for one locale; per-recipient values are still substitution tags."""

    locale: str
    subject: str
    html: str
    text: str
    # msgids that rendered untranslated: untranslated or fuzzy in the catalog, or used by the
    # templates but absent from it (a catalog not updated after the templates changed).
    untranslated: tuple[str, ...]

    def tags(self) -> set[str]:
        """Every substitution tag used in the subject, the HTML part or the text part."""
        return tags_in(self.subject) | tags_in(self.html) | tags_in(self.text)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form, e.g. for an XCom."""
        return {
            "locale": self.locale,
            "subject": self.subject,
            "html": self.html,
            "text": self.text,
            "untranslated": list(self.untranslated),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LocaleContent:
        """The inverse of ``to_dict``; a malformed payload is a ContentError."""
        expected = {"locale", "subject", "html", "text", "untranslated"}
        if not isinstance(data, Mapping) or set(data) != expected:
            keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ContentError(
                f"not a rendered locale content: expected keys {sorted(expected)}, got {keys}"
            )
        for key in ("locale", "subject", "html", "text"):
            if not isinstance(data[key], str):
                raise ContentError(f"rendered locale content: {key!r} must be a string")
        untranslated = data["untranslated"]
        if not isinstance(untranslated, list | tuple) or not all(
            isinstance(msgid, str) for msgid in untranslated
        ):
            raise ContentError("rendered locale content: 'untranslated' must be a list of strings")
        return cls(
            locale=data["locale"],
            subject=data["subject"],
            html=data["html"],
            text=data["text"],
            untranslated=tuple(untranslated),
        )


def render_content(
    spec: CampaignSpec, templates_dir: Path, translations_dir: Path
) -> dict[str, LocaleContent]:
    """Every locale of the campaign rendered from its template and catalogs, in its order."""
    return render_locales(
        templates_dir,
        translations_dir,
        spec.template,
        locales=spec.locales,
        fields=spec.fields,
        campaign={
            "name": spec.name,
            "sender_name": spec.sender.name,
            "company_address": spec.company_address,
        },
    )


def render_locales(
    templates_dir: Path,
    translations_dir: Path,
    template: str,
    *,
    locales: Sequence[str],
    fields: Sequence[str],
    campaign: Mapping[str, str],
) -> dict[str, LocaleContent]:
    """Render ``template`` once for each of ``locales``, in the order given."""
    if isinstance(locales, str) or not locales:
        raise ContentError(f"no locales to render template {template!r} for: {locales!r}")
    return {
        locale: render_locale(
            templates_dir, translations_dir, template, locale, fields=fields, campaign=campaign
        )
        for locale in dict.fromkeys(locales)
    }


def render_locale(
    templates_dir: Path,
    translations_dir: Path,
    template: str,
    locale: str,
    *,
    fields: Sequence[str],
    campaign: Mapping[str, str],
) -> LocaleContent:
    """Render subject, HTML and text of ``template`` for ``locale``.

    ``fields`` are the recipient fields the audience provides; ``recipient.<field>`` renders to
    the field's substitution tag. ``campaign`` values are plain text, autoescaped in HTML.
    Anything that cannot be rendered cleanly is a ContentError.
    """
    if not _TEMPLATE_NAME.fullmatch(template):
        raise ContentError(f"not a valid template name: {template!r}")
    babel_locale = _parse_locale(locale)
    fields = tuple(fields)
    for field in fields:
        if not isinstance(field, str) or not TAG_PATTERN.fullmatch(f"%%{field}%%"):
            raise ContentError(f"not a valid recipient field name: {field!r}")

    translations, untranslated = _load_translations(translations_dir, locale, babel_locale)
    missed = _MissRecorder()
    translations.add_fallback(missed)
    env = _environment(templates_dir, translations)
    allowed = {
        html: {substitution_tag(f, html=html) for f in (*fields, UNSUBSCRIBE_FIELD)}
        for html in (False, True)
    }

    def render(name: str, *, html: bool) -> str:
        path = f"{template}/{name}"
        where = f"{path} (locale {locale})"

        def with_recipient(probe: str | None) -> str:
            context = {
                "recipient": _Recipient(fields, html=html, probe=probe),
                "unsubscribe_url": _field_value(UNSUBSCRIBE_FIELD, html=html, probe=probe),
                "campaign": _Campaign(campaign),
                "locale": locale,
                "text_direction": babel_locale.text_direction,
            }
            return _render_template(env, templates_dir, path, where, context)

        output = with_recipient(None)
        # The content is rendered once and shared by every recipient of a locale, so it must
        # not depend on who receives it: rendered for two synthetic recipients, each field
        # standing where its tag stands, it must be the same text (a template that compares,
        # measures, slices or filters a recipient's value would differ).
        for probe in _PROBES:
            if _tags_for_probes(with_recipient(probe), probe, html=html) != output:
                raise ContentError(
                    f"{where}: the output depends on a recipient's values, not only where they "
                    "are inserted (a comparison, a length, a filter or a slice of a recipient "
                    "field): the content every recipient of a locale shares cannot"
                )
        _check_output(where, output, allowed[html], html=html)
        return output

    subject = render(SUBJECT_TEMPLATE, html=False).strip()
    if not subject:
        raise ContentError(f"{template}/{SUBJECT_TEMPLATE} (locale {locale}): the subject is empty")
    if len(subject.splitlines()) != 1:
        raise ContentError(
            f"{template}/{SUBJECT_TEMPLATE} (locale {locale}): the subject must be one line, got "
            f"{subject!r}"
        )
    html_where = f"{template}/{HTML_TEMPLATE} (locale {locale})"
    html = _inline_css(render(HTML_TEMPLATE, html=True), html_where)
    # Checked again after inlining, because what ships is the inliner's serialization.
    _check_output(html_where, html, allowed[True], html=True)
    _check_unsubscribe_link(html_where, html)
    text = _tidy_text(render(TEXT_TEMPLATE, html=False))
    if substitution_tag(UNSUBSCRIBE_FIELD, html=False) not in text:
        raise ContentError(
            f"{template}/{TEXT_TEMPLATE} (locale {locale}): the text part shows no unsubscribe "
            "link ({{ unsubscribe_url }}): every message must let its reader unsubscribe"
        )
    return LocaleContent(
        locale=locale,
        subject=subject,
        html=html,
        text=text,
        untranslated=tuple(sorted(set(untranslated) | missed.missed)),
    )


class _Recipient:
    """``recipient`` in templates: each known field renders to its substitution tag (or, for a
    synthetic recipient, to that recipient's stand-in value: ``_field_value``)."""

    __slots__ = ("_fields", "_html", "_probe")

    def __init__(self, fields: Sequence[str], *, html: bool, probe: str | None = None) -> None:
        self._fields = tuple(fields)
        self._html = html
        self._probe = probe

    def __getattr__(self, name: str) -> str:
        # Dunder and private lookups (markupsafe probes __html__, copy probes __deepcopy__)
        # must keep failing the ordinary way.
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._fields:
            # StrictUndefined raises UndefinedError as soon as the value is used, and still
            # lets a template test `recipient.x is defined` for an optional field.
            known = ", ".join(self._fields) or "none"
            return StrictUndefined(  # type: ignore[return-value]
                hint=f"recipient has no field {name!r} (the audience provides: {known})",
                name=name,
            )
        return _field_value(name, html=self._html, probe=self._probe)

    def __getitem__(self, name: str) -> str:
        return self.__getattr__(str(name))


class _Campaign:
    """``campaign`` in templates: plain values, autoescaped in HTML like any other string.

    Not a dict, so that keys named like dict methods (``items``, ``values``) still resolve to
    the values.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> str:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._values:
            known = ", ".join(sorted(self._values)) or "none"
            return StrictUndefined(  # type: ignore[return-value]
                hint=f"campaign has no value {name!r} (it has: {known})", name=name
            )
        return self._values[name]

    def __getitem__(self, name: str) -> str:
        return self.__getattr__(str(name))


class _MissRecorder(gettext.NullTranslations):
    """Last link of the fallback chain: notes every msgid the catalog could not translate.

    A compiled catalog holds only translated, non-fuzzy messages, so this sees exactly what
    renders in the source language instead of letting it pass silently.
    """

    def __init__(self) -> None:
        super().__init__()
        self.missed: set[str] = set()

    def gettext(self, message: str) -> str:
        self.missed.add(message)
        return super().gettext(message)

    def ngettext(self, msgid1: str, msgid2: str, n: int) -> str:
        self.missed.add(msgid1)
        return super().ngettext(msgid1, msgid2, n)

    def pgettext(self, context: str, message: str) -> str:
        self.missed.add(message)
        return super().pgettext(context, message)

    def npgettext(self, context: str, msgid1: str, msgid2: str, n: int) -> str:
        self.missed.add(msgid1)
        return super().npgettext(context, msgid1, msgid2, n)


# Two synthetic recipients, whose values of a field are stand-ins naming the field, in the
# private-use area (no template writes them, no filter leaves them as they are), of lengths
# unlike each other's and the tag's.
_PROBES = ("a", "b" * 24)
_PROBE_VALUE = re.compile("\ue000(a|b+):([^\ue001]*)\ue001")


def _field_value(field: str, *, html: bool, probe: str | None) -> str:
    """What a recipient field (or the unsubscribe link) renders to: its substitution tag, or a
    synthetic recipient's stand-in for it."""
    if probe is None:
        return _tag(field, html=html)
    value = f"\ue000{probe}:{field}\ue001"
    return Markup(value) if html else value


def _tags_for_probes(output: str, probe: str, *, html: bool) -> str:
    """A synthetic recipient's render with each of its stand-ins put back as the field's tag."""

    def tag(match: re.Match[str]) -> str:
        if match.group(1) != probe:
            return match.group(0)
        return str(_tag(match.group(2), html=html))

    return _PROBE_VALUE.sub(tag, output)


def _tag(field: str, *, html: bool) -> str:
    tag = substitution_tag(field, html=html)
    # Markup so autoescape leaves the tag alone; the provider inserts the escaped value.
    return Markup(tag) if html else tag


def _parse_locale(locale: str) -> Locale:
    if not isinstance(locale, str) or not _LOCALE_NAME.fullmatch(locale):
        raise ContentError(f"not a valid locale: {locale!r}")
    try:
        return Locale.parse(locale.replace("-", "_"))
    except (UnknownLocaleError, ValueError) as exc:
        raise ContentError(f"unknown locale {locale!r}: {exc}") from exc


def _load_translations(
    translations_dir: Path, locale: str, expected: Locale
) -> tuple[Translations, list[str]]:
    """The locale's catalog compiled in memory, and the msgids it leaves untranslated."""
    po_path = translations_dir / locale / "LC_MESSAGES" / f"{CATALOG_DOMAIN}.po"
    try:
        data = po_path.read_bytes()
    except FileNotFoundError as exc:
        raise ContentError(
            f"no translation catalog for locale {locale!r}: {po_path} does not exist"
        ) from exc
    except OSError as exc:
        raise ContentError(f"cannot read translation catalog {po_path}: {exc}") from exc
    _check_po_syntax(po_path, data)
    try:
        catalog = _read_po(po_path, data)
    except PoFileError as exc:
        # Babel counts lines from 0 in the error; people and editors count from 1.
        raise ContentError(
            f"cannot read translation catalog {po_path}, line {exc.lineno + 1}: "
            f"{str(exc).rsplit(' on ', 1)[0]}"
        ) from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise ContentError(f"cannot read translation catalog {po_path}: {exc}") from exc

    if catalog.locale is None:
        raise ContentError(f"translation catalog {po_path} has no Language header")
    if catalog.locale != expected:
        raise ContentError(
            f"translation catalog {po_path} is for language {catalog.locale_identifier!r}, "
            f"not {locale!r} (check its Language header)"
        )
    problems = [
        f"{_msgid(message)!r}: {error}" for message, errors in catalog.check() for error in errors
    ]
    if problems:
        raise ContentError(f"translation catalog {po_path} is broken: " + "; ".join(problems))

    buffer = BytesIO()
    write_mo(buffer, catalog, use_fuzzy=False)
    buffer.seek(0)
    return Translations(fp=buffer, domain=CATALOG_DOMAIN), _untranslated(catalog)


# A .po line that carries a string: a keyword (msgid, msgid_plural, msgctxt, msgstr,
# msgstr[N]) followed by a string, or a string alone continuing the one above. Obsolete entries
# (``#~``) are parsed by Babel too, so they are checked the same way.
_PO_KEYWORD_LINE = re.compile(
    rb"(msgid|msgid_plural|msgctxt|msgstr|msgstr\[[0-9]+\])(?:[ \t]+(.*))?"
)
# One complete C string literal, and nothing after it: Babel reads a line by dropping its first
# and last character, so ``"Hallo`` (no closing quote) would become ``Hall`` without a word.
_PO_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_PO_CHARSET = re.compile(rb"charset=([A-Za-z0-9_.:-]+)")
# The escapes Babel turns back into characters; any other (``\a``, ``\x41``, octal) it would
# ship as a backslash and a letter.
_PO_ESCAPE = re.compile(rb"\\(.)")
_PO_KNOWN_ESCAPES = frozenset(b'nrt"\\')


def _check_po_syntax(po_path: Path, data: bytes) -> None:
    """Refuse a catalog Babel would read without complaint but wrongly.

    ``read_po(..., abort_invalid=True)`` refuses unknown keywords and misplaced lines, but it
    does not check that each string is a closed, well-escaped literal: an unterminated string
    is silently truncated and ships (and ``msgstr[x]`` fails naming no line). Checked on bytes
    (quotes and backslashes are ASCII in any charset a catalog may declare), before Babel reads
    the file; the error names the line. A catalog declaring UTF-8 (or no charset: Babel reads
    it as UTF-8) must be UTF-8 on every line: Babel's decode error names a position in a line
    it does not name."""
    declared = _PO_CHARSET.search(data)
    if declared is None or declared.group(1).decode("ascii").lower().replace("_", "-") in {
        "utf-8",
        "utf8",
    }:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _po_error(
                po_path,
                data[: exc.start].count(b"\n") + 1,
                f"not UTF-8 (byte 0x{data[exc.start]:02x}), as its charset says: save it as UTF-8",
            ) from exc
    for number, raw_line in enumerate(data.splitlines(), start=1):
        line = raw_line.strip()
        if line.startswith(b"#~"):
            line = line[2:].lstrip()
        elif not line or line.startswith(b"#"):
            continue
        if line.startswith(b'"'):
            literal = line
        else:
            keyword = _PO_KEYWORD_LINE.fullmatch(line)
            if keyword is None:
                raise _po_error(
                    po_path,
                    number,
                    "not a comment, a string, or one of msgid, msgid_plural, msgctxt, msgstr "
                    "and msgstr[N] followed by a string",
                )
            literal = (keyword.group(2) or b"").strip()
            if not literal:
                raise _po_error(po_path, number, f"{keyword.group(1).decode()} has no string")
        if not _PO_STRING.fullmatch(literal):
            if not literal.startswith(b'"'):
                problem = "a string must be in double quotes"
            elif _PO_STRING.match(literal) is None:
                problem = "a string is not closed (a missing '\"' at the end of the line)"
            else:
                problem = "text after the closing '\"' (a '\"' inside a string is written '\\\"')"
            raise _po_error(po_path, number, problem)
        for escape in _PO_ESCAPE.finditer(literal[1:-1]):
            if escape.group(1)[0] not in _PO_KNOWN_ESCAPES:
                raise _po_error(
                    po_path,
                    number,
                    f"unsupported escape '\\{escape.group(1).decode('latin-1')}' "
                    '(use \\n, \\t, \\r, \\" or \\\\)',
                )


def _read_po(po_path: Path, data: bytes) -> Catalog:
    """``read_po(..., abort_invalid=True)``, refusing a msgid written twice (in one context):
    Babel keeps the first entry's translation and silently drops the second's, so which one
    ships depends on the order of the file, not on what the translator meant."""
    catalog = Catalog()
    seen: dict[tuple[str, str | None], int] = {}

    class StrictParser(PoFileParser):
        def _add_message(self) -> None:
            key = (self.messages[0].denormalize(), _denormalised(self.context))
            line, obsolete, before = self.offset + 1, self.obsolete, len(self.catalog)
            super()._add_message()
            if obsolete or key[0] == "":
                return
            if len(self.catalog) == before and key in seen:
                where = f" (context {key[1]!r})" if key[1] is not None else ""
                raise _po_error(
                    po_path,
                    line,
                    f"msgid {key[0]!r}{where} again (first on line {seen[key]}): Babel would "
                    "keep one translation and drop the other; keep one entry",
                )
            seen.setdefault(key, line)

    StrictParser(catalog, ignore_obsolete=False, abort_invalid=True).parse(BytesIO(data))
    return catalog


def _denormalised(context: Any) -> str | None:
    return context.denormalize() if context else None


def _po_error(po_path: Path, line: int, problem: str) -> ContentError:
    return ContentError(f"cannot read translation catalog {po_path}, line {line}: {problem}")


def _msgid(message: Message) -> str:
    return message.id if isinstance(message.id, str) else message.id[0]


def _untranslated(catalog: Catalog) -> list[str]:
    result = []
    for message in catalog:
        if not message.id:  # the header
            continue
        strings = message.string if isinstance(message.string, tuple) else (message.string,)
        if message.fuzzy or not all(strings):
            result.append(_msgid(message))
    return result


def _environment(templates_dir: Path, translations: Translations) -> Environment:
    # babel.cfg passes the same i18n options to the extractor; keep the two in step, or the
    # msgids extracted into messages.pot would differ from the ones looked up here.
    env = Environment(
        loader=FileSystemLoader(templates_dir),
        autoescape=select_autoescape(
            enabled_extensions=("html",), default_for_string=False, default=False
        ),
        undefined=StrictUndefined,
        extensions=["jinja2.ext.i18n"],
        auto_reload=False,
    )
    env.policies["ext.i18n.trimmed"] = True
    env.install_gettext_translations(translations, newstyle=True)  # type: ignore[attr-defined]
    return env


def _render_template(
    env: Environment, templates_dir: Path, path: str, label: str, context: Mapping[str, Any]
) -> str:
    """Render one template; every Jinja failure becomes a ContentError naming file and line."""
    try:
        return env.get_template(path).render(context)
    except UnicodeDecodeError as exc:
        raise ContentError(f"{label}: {_not_utf8(templates_dir) or exc}") from exc
    except TemplateSyntaxError as exc:
        where = exc.filename or exc.name or path
        raise ContentError(f"{where}:{exc.lineno}: template syntax error: {exc.message}") from exc
    except TemplateNotFound as exc:
        raise ContentError(f"{label}: template {exc.name!r} not found in {templates_dir}") from exc
    except UndefinedError as exc:
        where = _template_frame(exc.__traceback__, templates_dir) or label
        raise ContentError(f"{where}: undefined: {exc.message} ({label})") from exc
    except TemplateError as exc:
        where = _template_frame(exc.__traceback__, templates_dir) or label
        raise ContentError(f"{where}: cannot render {label}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        # newstyle gettext %-formats every translated string with the trans variables; a
        # placeholder the catalog check let through still must not surface as a bare KeyError.
        where = _template_frame(exc.__traceback__, templates_dir) or label
        raise ContentError(f"{where}: cannot render {label}: {type(exc).__name__}: {exc}") from exc


class _Links(HTMLParser):
    """The ``href`` of every ``<a>`` a browser renders: markup inside a comment (or after an
    unclosed ``<!--``, which hides the rest of the page) is no link."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [value or "" for name, value in attrs if name == "href"]


def _check_unsubscribe_link(where: str, html: str) -> None:
    """The HTML part links to the recipient's unsubscribe URL where a reader sees it."""
    links = _Links()
    links.feed(html)
    links.close()
    tag = substitution_tag(UNSUBSCRIBE_FIELD, html=True)
    if not any(href.strip() == tag for href in links.hrefs):
        raise ContentError(
            f'{where}: the HTML part shows no unsubscribe link (an <a href="{{{{ '
            'unsubscribe_url }}">, outside any comment): every message must let its reader '
            "unsubscribe"
        )


def _not_utf8(templates_dir: Path) -> str | None:
    """Which template file is not UTF-8, and on which line (Jinja's error names neither)."""
    for path in sorted(p for p in templates_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            return (
                f"template {path}, line {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save "
                "it as UTF-8"
            )
    return None


def _template_frame(tb: TracebackType | None, templates_dir: Path) -> str | None:
    """``file:line`` of the innermost template frame; Jinja maps those frames to the source."""
    root = str(templates_dir.resolve())
    found = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if Path(filename).resolve().is_relative_to(root):
            found = f"{filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def _check_output(label: str, output: str, allowed: set[str], *, html: bool) -> None:
    """No Jinja syntax left over, and only the tags of this part's variant and known fields."""
    foreign = sorted(tags_in(output) - allowed)
    if foreign:
        variant = "HTML (|html)" if html else "plain"
        raise ContentError(
            f"{label}: output uses substitution tags {', '.join(foreign)}; only {variant} tags of "
            f"the recipient fields may appear here"
        )
    # Valid tags contain "%%", which the leftover check would flag; remove them first.
    remainder = TAG_PATTERN.sub("", output)
    if html:
        for match in _STYLE_ELEMENT.finditer(remainder):
            if leftover := _STYLE_LEFTOVER.search(match.group(2)):
                raise ContentError(
                    f"{label}: output contains a leftover template marker "
                    f"{leftover.group(0)!r} in a <style> block"
                )
        remainder = _STYLE_ELEMENT.sub(r"\1\3", remainder)
    if leftover := LEFTOVER_MARKER.search(remainder):
        start = max(leftover.start() - 30, 0)
        raise ContentError(
            f"{label}: output contains a leftover template marker {leftover.group(0)!r} near "
            f"{remainder[start : leftover.end() + 30]!r}"
        )


def _inline_css(html: str, where: str) -> str:
    """Inline the <style> rules into style attributes, leaving substitution tags untouched.

    Tags are swapped for inert alphanumeric tokens first: an HTML serializer is free to
    percent-encode or escape "%" and "|" in attributes such as href, and css-inline's output
    format is not something to rely on across versions.
    """
    if _TAG_TOKEN_PREFIX in html:
        raise ContentError(f"{where}: output contains the reserved word {_TAG_TOKEN_PREFIX!r}")
    tokens: dict[str, str] = {}

    def protect(match: re.Match[str]) -> str:
        tag = match.group(0)
        if tag not in tokens:
            tokens[tag] = _TAG_TOKEN.format(index=len(tokens))
        return tokens[tag]

    try:
        inlined = _INLINER.inline(TAG_PATTERN.sub(protect, html))
    except ValueError as exc:  # css_inline.InlineError is a ValueError
        raise ContentError(f"{where}: cannot inline CSS: {exc}") from exc
    for tag, token in tokens.items():
        inlined = inlined.replace(token, tag)
    if _tag_counts(inlined) != _tag_counts(html):
        raise ContentError(f"{where}: CSS inlining changed the substitution tags")
    return inlined


def _tag_counts(text: str) -> Counter[str]:
    return Counter(match.group(0) for match in TAG_PATTERN.finditer(text))


def _tidy_text(text: str) -> str:
    # Block tags on lines of their own leave blank lines behind; at most one blank line in a row
    # and no trailing spaces keep the text part readable without contorting the templates.
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)) + "\n"
