"""render_content and render_locales: the example campaign in every locale, and the ways rendering
must fail."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import pytest
from babel.messages.catalog import Catalog
from babel.messages.plurals import get_plural
from babel.messages.pofile import read_po, write_po

from mailroom.content import LocaleContent, render_locale, render_locales
from mailroom.errors import ContentError
from mailroom.substitutions import tags_in

pytestmark = pytest.mark.unit

INCLUDE = Path(__file__).resolve().parents[2] / "include"
TEMPLATES = INCLUDE / "templates"
TRANSLATIONS = INCLUDE / "translations"
LOCALES = ("en", "de", "fr", "es", "ja")
FIELDS = ("first_name",)
CAMPAIGN = {
    "name": "winter_update",
    "sender_name": "Example Exchange",
    "company_address": "Example Exchange Ltd., 1 Harbour Street, Dublin D02, Ireland",
}
HTML_TAGS = {"%%first_name|html%%", "%%unsubscribe_url|html%%"}
PLAIN_TAGS = {"%%first_name%%", "%%unsubscribe_url%%"}

# One sentence per locale, as the translator wrote it; finding it proves that catalog was used.
SUBJECTS = {
    "en": "%%first_name%%, here is your winter update",
    "de": "%%first_name%%, hier ist Ihr Winter-Update",
    "fr": "%%first_name%%, découvrez vos nouveautés de l\u2019hiver",
    "es": "%%first_name%%, estas son tus novedades de invierno",
    "ja": "%%first_name%%様、冬のアップデートのお知らせです",
}
SENTENCES = {
    "en": "You can turn on all three under Settings → Security.",
    "de": "Alle drei Funktionen können Sie unter Einstellungen → Sicherheit aktivieren.",
    "fr": "Vous pouvez activer ces trois fonctionnalités dans Paramètres → Sécurité.",
    "es": "Puedes activar las tres en Configuración → Seguridad.",
    "ja": "これら3つの機能は、「設定」→「セキュリティ」から有効にできます。",
}
GREETINGS = {
    "en": "Hi %%first_name|html%%,",
    "de": "Hallo %%first_name|html%%,",
    "fr": "Bonjour %%first_name|html%%,",
    "es": "Hola, %%first_name|html%%:",
    "ja": "%%first_name|html%%様",
}


# --- a small DOM on the standard library, so the assertions look at structure, not substrings


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    def iter(self) -> Iterator[Element]:
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.iter()

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class _TreeBuilder(HTMLParser):
    VOID: ClassVar[set[str]] = {
        "area",
        "base",
        "br",
        "col",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "source",
        "wbr",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Element:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def by_class(root: Element, name: str) -> list[Element]:
    return [e for e in root.iter() if name in e.classes()]


def by_tag(root: Element, tag: str) -> list[Element]:
    return [e for e in root.iter() if e.tag == tag]


# --- the example campaign


@pytest.fixture(scope="module")
def rendered() -> dict[str, LocaleContent]:
    return render_locales(
        TEMPLATES, TRANSLATIONS, "winter_update", locales=LOCALES, fields=FIELDS, campaign=CAMPAIGN
    )


def test_renders_the_requested_locales_in_order(rendered: dict[str, LocaleContent]) -> None:
    assert list(rendered) == list(LOCALES)
    assert [content.locale for content in rendered.values()] == list(LOCALES)


@pytest.mark.parametrize("locale", LOCALES)
def test_every_catalog_is_complete(rendered: dict[str, LocaleContent], locale: str) -> None:
    assert rendered[locale].untranslated == ()


@pytest.mark.parametrize("locale", LOCALES)
def test_catalog_headers_name_the_language_and_its_plural_rule(locale: str) -> None:
    with (TRANSLATIONS / locale / "LC_MESSAGES" / "messages.po").open("rb") as fp:
        catalog = read_po(fp)
    assert str(catalog.locale) == locale
    assert catalog.plural_forms == get_plural(locale).plural_forms
    assert not catalog.fuzzy
    assert not [message.id for message in catalog if message.id and message.fuzzy]


@pytest.mark.parametrize("locale", LOCALES)
def test_subject_is_one_translated_line_with_the_plain_tag(
    rendered: dict[str, LocaleContent], locale: str
) -> None:
    subject = rendered[locale].subject
    assert subject == SUBJECTS[locale]
    assert len(subject.splitlines()) == 1
    assert tags_in(subject) == {"%%first_name%%"}


@pytest.mark.parametrize("locale", LOCALES)
def test_html_is_translated_and_declares_its_language(
    rendered: dict[str, LocaleContent], locale: str
) -> None:
    root = parse(rendered[locale].html)
    (html,) = by_tag(root, "html")
    assert html.attrs["lang"] == locale
    assert html.attrs["dir"] == "ltr"
    paragraphs = [p.text().strip() for p in by_tag(root, "p")]
    assert SENTENCES[locale] in paragraphs


@pytest.mark.parametrize("locale", LOCALES)
def test_greeting_carries_the_first_name_html_tag(
    rendered: dict[str, LocaleContent], locale: str
) -> None:
    (greeting,) = by_class(parse(rendered[locale].html), "greeting")
    assert greeting.text().strip() == GREETINGS[locale]


@pytest.mark.parametrize("locale", LOCALES)
def test_unsubscribe_link_is_exactly_the_html_tag(
    rendered: dict[str, LocaleContent], locale: str
) -> None:
    html = rendered[locale].html
    (link,) = by_class(parse(html), "unsubscribe")
    assert link.tag == "a"
    assert link.attrs["href"] == "%%unsubscribe_url|html%%"
    # The parser decodes character references, so also check the bytes a client receives:
    # an inliner that wrote "&#124;" or "%25" would still parse to the same href.
    assert 'href="%%unsubscribe_url|html%%"' in html


@pytest.mark.parametrize("locale", LOCALES)
def test_parts_use_only_their_own_tag_variant(
    rendered: dict[str, LocaleContent], locale: str
) -> None:
    content = rendered[locale]
    assert tags_in(content.html) == HTML_TAGS
    assert tags_in(content.text) == PLAIN_TAGS
    assert "|html" not in content.text
    assert content.tags() == HTML_TAGS | PLAIN_TAGS


@pytest.mark.parametrize("locale", LOCALES)
def test_text_part_is_written_plain_text(rendered: dict[str, LocaleContent], locale: str) -> None:
    text = rendered[locale].text
    assert SENTENCES[locale] in text.splitlines()
    assert "<" not in text
    assert "&" not in text  # nothing HTML-escaped
    assert "\n\n\n" not in text
    last_line = text.rstrip("\n").splitlines()[-1]
    assert last_line.endswith("%%unsubscribe_url%%")
    assert CAMPAIGN["company_address"] in text.splitlines()


def test_styles_are_inlined_and_media_queries_kept(rendered: dict[str, LocaleContent]) -> None:
    root = parse(rendered["en"].html)
    (button,) = by_class(root, "button")
    assert "padding: 12px 24px" in button.attrs.get("style", "")
    (masthead,) = by_class(root, "masthead")
    assert "background-color: #0b1f3a" in masthead.attrs.get("style", "")
    styles = [s.text().strip() for s in by_tag(root, "style")]
    assert styles, "the @media rules need a <style> block"
    # Everything that could be inlined was; what is left is only the responsive rules.
    assert all(style.startswith("@media") for style in styles)


def test_campaign_values_are_escaped_in_html_but_not_in_text() -> None:
    campaign = {
        **CAMPAIGN,
        "sender_name": "Example & Exchange",
        "company_address": "<script>alert(1)</script> 1 Example Street",
    }
    content = render_locale(
        TEMPLATES, TRANSLATIONS, "winter_update", "de", fields=FIELDS, campaign=campaign
    )
    root = parse(content.html)
    assert by_tag(root, "script") == []
    (address,) = by_class(root, "company-address")
    assert address.text() == campaign["company_address"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in content.html
    # Also where the value goes through a translated string's placeholder:
    assert "Ihr Team von Example &amp; Exchange" in content.html
    assert "Example & Exchange" not in content.html
    assert campaign["company_address"] in content.text
    assert "Ihr Team von Example & Exchange" in content.text


def test_rendering_is_deterministic(rendered: dict[str, LocaleContent]) -> None:
    again = render_locale(
        TEMPLATES, TRANSLATIONS, "winter_update", "fr", fields=FIELDS, campaign=CAMPAIGN
    )
    assert again == rendered["fr"]


def test_round_trips_through_json(rendered: dict[str, LocaleContent]) -> None:
    for content in rendered.values():
        assert LocaleContent.from_dict(json.loads(json.dumps(content.to_dict()))) == content


@pytest.mark.parametrize(
    "payload",
    [
        {"locale": "de", "subject": "s", "html": "h", "text": "t"},
        {"locale": "de", "subject": "s", "html": "h", "text": 1, "untranslated": []},
        {"locale": "de", "subject": "s", "html": "h", "text": "t", "untranslated": "abc"},
        ["not", "a", "mapping"],
    ],
)
def test_from_dict_rejects_malformed_payloads(payload: object) -> None:
    with pytest.raises(ContentError):
        LocaleContent.from_dict(payload)  # type: ignore[arg-type]


def test_render_all_needs_locales() -> None:
    with pytest.raises(ContentError, match="no locales"):
        render_locales(
            TEMPLATES, TRANSLATIONS, "winter_update", locales=[], fields=FIELDS, campaign=CAMPAIGN
        )


# --- failures, on a small campaign written to tmp_path

SUBJECT = "{% trans name=recipient.first_name %}Hello {{ name }}{% endtrans %}\n"
BODY_HTML = """<!DOCTYPE html>
<html lang="{{ locale }}"><head><style>p { color: #333333; }</style></head>
<body>
<p class="greeting">{% trans name=recipient.first_name %}Hello {{ name }}{% endtrans %}</p>
<p><a href="{{ unsubscribe_url }}" title="{{ recipient.first_name }}">{{ _("Unsubscribe") }}</a></p>
</body></html>
"""
BODY_TXT = """{% trans name=recipient.first_name %}Hello {{ name }}{% endtrans %}

{{ _("Unsubscribe") }}: {{ unsubscribe_url }}
"""


@dataclass
class Project:
    templates: Path
    translations: Path

    def write(self, name: str, source: str) -> Path:
        path = self.templates / "mini" / name
        path.write_text(source, encoding="utf-8")
        return path

    def catalog(
        self,
        locale: str,
        entries: dict[str, str],
        *,
        language: str | None = None,
        fuzzy: tuple[str, ...] = (),
    ) -> Path:
        catalog = Catalog(locale=language or locale)
        for msgid, msgstr in entries.items():
            catalog.add(msgid, msgstr, flags=["fuzzy"] if msgid in fuzzy else [])
        path = self.translations / locale / "LC_MESSAGES" / "messages.po"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fp:
            write_po(fp, catalog)
        return path

    def render(self, locale: str = "de") -> LocaleContent:
        return render_locale(
            self.templates,
            self.translations,
            "mini",
            locale,
            fields=FIELDS,
            campaign=CAMPAIGN,
        )


GERMAN = {"Hello %(name)s": "Hallo %(name)s", "Unsubscribe": "Abbestellen"}


def at(path: Path) -> str:
    """``path`` as a regex, for matching error messages that name it."""
    return re.escape(str(path))


@pytest.fixture
def project(tmp_path: Path) -> Project:
    project = Project(tmp_path / "templates", tmp_path / "translations")
    (project.templates / "mini").mkdir(parents=True)
    project.write("subject.txt", SUBJECT)
    project.write("body.html", BODY_HTML)
    project.write("body.txt", BODY_TXT)
    project.catalog("de", GERMAN)
    return project


def test_small_campaign_renders(project: Project) -> None:
    content = project.render()
    assert content.subject == "Hallo %%first_name%%"
    assert content.text == "Hallo %%first_name%%\n\nAbbestellen: %%unsubscribe_url%%\n"
    assert 'href="%%unsubscribe_url|html%%"' in content.html
    assert 'title="%%first_name|html%%"' in content.html
    assert '<p class="greeting" style="color: #333333;">Hallo %%first_name|html%%</p>' in (
        content.html
    )
    assert content.untranslated == ()


@pytest.mark.parametrize(
    "source",
    [
        "{{ recipient.first_name | upper }}\n",
        "{{ recipient.first_name[:1] }}.\n",
        "{% if recipient.first_name | length > 14 %}Hello you{% else %}Hi{% endif %}\n",
        "{% if unsubscribe_url.startswith('%') %}tag{% endif %}\n",
        "[{{ recipient.first_name | center(60) }}]\n",
    ],
    ids=["filtered", "sliced", "measured", "link inspected", "padded"],
)
def test_content_depending_on_a_recipients_value_is_refused(project: Project, source: str) -> None:
    """Rendered for two synthetic recipients, the text would differ: the content every
    recipient of a locale shares cannot depend on who receives it."""
    project.write("body.txt", source)
    with pytest.raises(
        ContentError, match=r"mini/body\.txt \(locale de\): the output depends on a recipient's"
    ):
        project.render()


def test_inserting_a_recipients_value_anywhere_is_not_depending_on_it(project: Project) -> None:
    project.write(
        "body.txt",
        "{% set n = recipient.first_name %}{{ n }} / {{ recipient['first_name'] }}"
        " / {{ unsubscribe_url }} / {{ campaign.name | upper }}\n",
    )
    assert project.render().text.startswith("%%first_name%% / %%first_name%% / ")


def test_syntax_error_names_file_and_line(project: Project) -> None:
    path = project.write("body.html", "<p>one</p>\n<p>two</p>\n{% if %}\n")
    with pytest.raises(ContentError, match=rf"{at(path)}:3: template syntax error"):
        project.render()


def test_undefined_variable_names_template_and_variable(project: Project) -> None:
    path = project.write("body.txt", "line one\n{{ coupon_code }}\n")
    with pytest.raises(ContentError, match=rf"{at(path)}:2: undefined: 'coupon_code' is undefined"):
        project.render()


def test_unknown_recipient_field_names_the_field(project: Project) -> None:
    path = project.write("body.html", "<p>{{ recipient.last_name }}</p>\n")
    with pytest.raises(ContentError, match=rf"{at(path)}:1: .*recipient has no field 'last_name'"):
        project.render()


def test_unknown_campaign_value_names_it(project: Project) -> None:
    project.write("body.txt", "{{ campaign.coupon }}\n")
    with pytest.raises(ContentError, match="campaign has no value 'coupon'"):
        project.render()


def test_missing_template_is_named(project: Project) -> None:
    (project.templates / "mini" / "body.txt").unlink()
    with pytest.raises(ContentError, match=r"template 'mini/body\.txt' not found"):
        project.render()


def test_missing_layout_is_named(project: Project) -> None:
    project.write("body.html", '{% extends "_layouts/gone.html" %}\n')
    with pytest.raises(ContentError, match=r"template '_layouts/gone\.html' not found"):
        project.render()


def test_missing_catalog_is_an_error_not_a_fallback(project: Project) -> None:
    expected = project.translations / "fr" / "LC_MESSAGES" / "messages.po"
    with pytest.raises(ContentError, match=rf"locale 'fr': {at(expected)} does not exist"):
        project.render("fr")


def test_catalog_for_another_language_is_refused(project: Project) -> None:
    path = project.catalog("de", GERMAN, language="fr")
    with pytest.raises(ContentError, match=rf"{at(path)} is for language 'fr', not 'de'"):
        project.render()


def test_unreadable_catalog_is_named(project: Project) -> None:
    path = project.translations / "de" / "LC_MESSAGES" / "messages.po"
    path.write_text('msgid ""\nmsgstr ""\n"Language: de\\n"\n\nmsgid "Hello\nbroken', "utf-8")
    with pytest.raises(ContentError, match=rf"cannot read translation catalog {at(path)}"):
        project.render()


PO_HEADER = (
    'msgid ""\nmsgstr ""\n"Language: de\\n"\n"Plural-Forms: nplurals=2; plural=(n != 1);\\n"\n\n'
)
# The header above is lines 1 to 5; each entry starts on line 6.
PO_UNSUBSCRIBE = '\nmsgid "Unsubscribe"\nmsgstr "Abbestellen"\n'
# (entries after the header, the line the error must name, what it must say)
BROKEN_CATALOGS: dict[str, tuple[str, int, str]] = {
    "unterminated msgstr": (
        'msgid "Hello %(name)s"\nmsgstr "Hallo %(name)s\n' + PO_UNSUBSCRIBE,
        7,
        r"a string is not closed \(a missing '\"' at the end of the line\)",
    ),
    "unterminated msgid": (
        'msgid "Hello %(name)s\nmsgstr "Hallo %(name)s"\n',
        6,
        r"a string is not closed",
    ),
    "unterminated continuation line": (
        'msgid "Hello %(name)s"\nmsgstr ""\n"Hallo "\n"%(name)s\n',
        9,
        r"a string is not closed",
    ),
    "a quote inside a string unescaped": (
        'msgid "Hello %(name)s"\nmsgstr "Hallo "lieber" %(name)s"\n',
        7,
        r"text after the closing '\"' \(a '\"' inside a string is written '\\\"'\)",
    ),
    "a string without quotes": (
        'msgid "Hello %(name)s"\nmsgstr Hallo %(name)s\n',
        7,
        r"a string must be in double quotes",
    ),
    "a keyword without its string": (
        'msgid "Hello %(name)s"\nmsgstr\n',
        7,
        r"msgstr has no string",
    ),
    "an escape Babel would ship raw": (
        'msgid "Hello %(name)s"\nmsgstr "Hallo\\a %(name)s"\n',
        7,
        r"unsupported escape '\\a' \(use \\n, \\t, \\r, \\\" or \\\\\)",
    ),
    "a misspelt keyword": (
        'msgid "Hello %(name)s"\nmsgstrr "Hallo %(name)s"\n',
        7,
        r"not a comment, a string, or one of msgid, msgid_plural, msgctxt, msgstr and msgstr\[N\]",
    ),
    "a plural index that is not a number": (
        'msgid "Hello %(name)s"\nmsgid_plural "Hellos"\nmsgstr[x] "Hallo"\n',
        8,
        r"not a comment, a string",
    ),
    "a msgid without msgstr": (
        'msgid "Hello %(name)s"\n' + PO_UNSUBSCRIBE,
        6,
        r"missing msgstr for msgid 'Hello %\(name\)s'",
    ),
    "a msgid twice (Babel keeps the first and drops the second)": (
        'msgid "Hello %(name)s"\nmsgstr "Hallo %(name)s"\n'
        + PO_UNSUBSCRIBE
        + '\nmsgid "Hello %(name)s"\nmsgstr "Servus %(name)s"\n',
        12,
        r"msgid 'Hello %\(name\)s' again \(first on line 6\): Babel would keep one translation "
        r"and drop the other; keep one entry",
    ),
    "a msgid twice in one context": (
        'msgctxt "menu"\nmsgid "Unsubscribe"\nmsgstr "Abbestellen"\n'
        '\nmsgctxt "menu"\nmsgid "Unsubscribe"\nmsgstr "Abmelden"\n',
        11,
        r"msgid 'Unsubscribe' \(context 'menu'\) again \(first on line 7\)",
    ),
    "an unterminated obsolete entry": (
        'msgid "Hello %(name)s"\nmsgstr "Hallo %(name)s"\n'
        + PO_UNSUBSCRIBE
        + '\n#~ msgid "Old"\n#~ msgstr "Alt\n',
        13,
        r"a string is not closed",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_CATALOGS))
def test_a_catalog_that_does_not_parse_fails_render_naming_file_and_line(
    project: Project, case: str
) -> None:
    entries, line, problem = BROKEN_CATALOGS[case]
    path = project.translations / "de" / "LC_MESSAGES" / "messages.po"
    path.write_text(PO_HEADER + entries, "utf-8")

    with pytest.raises(ContentError) as caught:
        project.render()

    expected = rf"cannot read translation catalog {at(path)}, line {line}: {problem}.*"
    assert re.fullmatch(expected, str(caught.value)), str(caught.value)


def test_a_hand_written_catalog_with_every_escape_babel_reads_renders(project: Project) -> None:
    """The check refuses only what Babel would misread: wrapped strings, escaped quotes and
    backslashes, obsolete entries (one of them an old translation of a msgid still in use),
    one msgid in two contexts, and comments are all read as written."""
    path = project.translations / "de" / "LC_MESSAGES" / "messages.po"
    path.write_text(
        PO_HEADER
        + '# translator comment\n#, python-format\nmsgid "Hello %(name)s"\n'
        + 'msgstr ""\n"Hallo \\"\\\\\\" "\n  "%(name)s"\n'
        + PO_UNSUBSCRIBE
        + '\nmsgctxt "menu"\nmsgid "Unsubscribe"\nmsgstr "Abmelden"\n'
        + '\n#~ msgid "Old"\n#~ msgstr "Alt"\n'
        + '\n#~ msgid "Unsubscribe"\n#~ msgstr "Austragen"\n',
        "utf-8",
    )

    content = project.render()

    assert 'Hallo "\\" ' in content.subject


def test_translation_with_a_wrong_placeholder_is_refused(project: Project) -> None:
    path = project.catalog("de", {**GERMAN, "Hello %(name)s": "Hallo %(vorname)s"})
    with pytest.raises(ContentError, match=rf"{at(path)} is broken: 'Hello %\(name\)s'"):
        project.render()


def test_untranslated_fuzzy_and_absent_msgids_are_reported(project: Project) -> None:
    project.catalog("de", {"Hello %(name)s": "Hallo %(name)s", "Unused": ""})
    content = project.render()
    assert content.untranslated == ("Unsubscribe", "Unused")
    assert "Unsubscribe: %%unsubscribe_url%%" in content.text  # rendered, in English

    project.catalog("de", GERMAN, fuzzy=("Hello %(name)s",))
    content = project.render()
    assert content.untranslated == ("Hello %(name)s",)
    assert content.subject == "Hello %%first_name%%"  # a fuzzy entry is not used


def test_multi_line_subject_is_refused(project: Project) -> None:
    project.write("subject.txt", "Hello\n{{ recipient.first_name }}\n")
    with pytest.raises(ContentError, match="subject must be one line"):
        project.render()


def test_empty_subject_is_refused(project: Project) -> None:
    project.write("subject.txt", "{# nothing #}\n")
    with pytest.raises(ContentError, match="subject is empty"):
        project.render()


def test_leftover_template_marker_is_refused(project: Project) -> None:
    project.write("body.txt", "{{ '{{' }} recipient.first_name }}\n{{ unsubscribe_url }}\n")
    with pytest.raises(ContentError, match=r"mini/body\.txt \(locale de\): .*leftover"):
        project.render()


def test_malformed_substitution_tag_is_a_leftover(project: Project) -> None:
    project.write("body.txt", "Hi %%first name%%\n")
    with pytest.raises(ContentError, match="leftover template marker '%%'"):
        project.render()


def test_plain_tag_in_html_is_refused(project: Project) -> None:
    # The plain tag carries the raw, unescaped value; in HTML that is an injection.
    project.write("body.html", "<p>%%first_name%%</p>\n")
    with pytest.raises(ContentError, match="%%first_name%%; only HTML"):
        project.render()


def test_tag_of_a_field_the_audience_lacks_is_refused(project: Project) -> None:
    project.write("body.txt", "Your code: %%coupon%%\n")
    with pytest.raises(ContentError, match="%%coupon%%"):
        project.render()


@pytest.mark.parametrize("locale", ["../de", "de/../../x", ""])
def test_locale_that_is_not_a_locale_is_refused(project: Project, locale: str) -> None:
    with pytest.raises(ContentError, match="not a valid locale"):
        project.render(locale)
