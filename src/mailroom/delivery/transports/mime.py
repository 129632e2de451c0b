"""The SMTP transport's messages: how a frozen request body becomes one MIME message per
personalization, and the MIME guard every message passes on its exact bytes.

Two builders make the same bytes:

* ``build_mime_message`` is the reference: one ``EmailMessage`` per personalization, through the
  ``email`` package. It is the oracle the fast builder is held to (property tests compare them
  byte for byte) and what a transport given its own ``build_message`` uses.
* ``MessageTemplate`` is what the transport sends with: everything one request body's messages
  share (the sender, the reply-to, the date, the MIME skeleton with its boundary, the lines of
  each part that hold no substitution) is made once per body, by the ``email`` package itself or
  as it makes them; each personalization's own pieces (``To:``, the substituted subject and part
  lines, its headers, the Message-ID) are rendered with the same policy calls the reference
  makes, or, for the plain values almost every message holds, written as the package would
  write them, and spliced in. A ``TemplateSeed`` (date, boundary, Message-ID stamp) makes the
  same message the same bytes each time it is made.

The guard (``MimeGuard``) decides on the bytes alone, quickly, what it can: one
envelope recipient equal to the personalization's address, no bare CR or LF, no line over 998
characters, every header line a field or a continuation, exactly the headers that were set, no
Cc/Bcc, one of each single header, ``To:`` holding exactly the envelope recipient and a
``From:`` already read as one address. A ``To:`` or ``From:`` it cannot read that simply goes
to the full guard (``check_mime_message``, which parses the whole message with the ``email``
package): anything unfamiliar gets the slower, complete check, never a pass.
"""

from __future__ import annotations

import binascii
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email import policy as email_policy
from email import quoprimime
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formatdate
from itertools import pairwise
from typing import Any

from mailroom.addresses import is_valid_single_address
from mailroom.errors import EnvelopeViolation
from mailroom.substitutions import apply_substitutions

# RFC 5322 2.1.1 / RFC 5321 4.5.3.1.6: at most 998 characters on a line, without its CRLF.
MAX_LINE_LENGTH = 998
# Headers that would put the message in front of anyone but its one recipient.
FORBIDDEN_HEADERS = frozenset({"cc", "bcc", "resent-to", "resent-cc", "resent-bcc"})
SINGLE_HEADERS = ("to", "from", "subject", "date", "message-id", "reply-to", "sender")
# The SMTP policy (CRLF, 78-column folding), but header values set raw (ASCII values such as
# List-Unsubscribe, folded here at their commas) are written as they are, never re-encoded: an
# RFC 2047 encoded List-Unsubscribe URL would not be a URL to the mail client any more.
MESSAGE_POLICY = email_policy.SMTP.clone(refold_source="none")
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext
_FIELD_LINE = re.compile(rb"[!-9;-~]+:")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# Values the email package writes as they are: an address of plain characters, a Message-ID
# as make_msgid makes them (both short enough not to be folded).
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*@[A-Za-z0-9][A-Za-z0-9.-]*")
_PLAIN_MESSAGE_ID = re.compile(r"<[0-9][0-9.]*@[A-Za-z0-9][A-Za-z0-9.-]*>")
# How many rendered values (subjects, headers) one template keeps; beyond, it starts again.
_RENDERED_KEPT = 50_000
_QP_LINES_KEPT = 20_000
# A line quoted-printable leaves as it is but for its "=" (printable ASCII and tabs).
_QP_PLAIN_LINE = re.compile(rb"[\t -~]*")

MessageBuilder = Callable[[Mapping[str, Any], int, str], EmailMessage]


def build_mime_message(
    body: Mapping[str, Any],
    index: int,
    message_id: str,
    *,
    date: str | None = None,
    boundary: str | None = None,
) -> EmailMessage:
    """The message for personalization ``index`` of a SendGrid v3 request body.

    Substitutions are applied to the subject and both content parts with plain string
    replacement in one pass (a value is never substituted again), as SendGrid's legacy
    substitutions do; request-level headers come first, the personalization's own after them.
    ``date`` (default: now) and ``boundary`` (default: the generator's random one) make the
    bytes reproducible, for comparing a builder against this one.
    """
    item = body["personalizations"][index]
    substitutions = item.get("substitutions") or {}
    msg = EmailMessage(policy=MESSAGE_POLICY)
    try:
        msg["From"] = _address(body["from"])
        msg["To"] = _address(item["to"][0])
        if body.get("reply_to"):
            msg["Reply-To"] = _address(body["reply_to"])
        msg["Subject"] = apply_substitutions(str(body.get("subject") or ""), substitutions)
        msg["Date"] = date if date is not None else formatdate(usegmt=True)
        msg["Message-ID"] = message_id
        headers = {**(body.get("headers") or {}), **(item.get("headers") or {})}
        for name, value in headers.items():
            _set_header(msg, str(name), str(value))
        text = _content(body, "text/plain")
        html = _content(body, "text/html")
        if text is not None:
            msg.set_content(apply_substitutions(text, substitutions), subtype="plain")
        if html is not None:
            html = apply_substitutions(html, substitutions)
            if text is None:
                msg.set_content(html, subtype="html")
            else:
                msg.add_alternative(html, subtype="html")
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        # The email package refuses CR/LF in a header value, an unparsable address, …
        raise EnvelopeViolation(
            f"personalization {index}: cannot build its message: {exc}"
        ) from exc
    if boundary is not None and msg.is_multipart():
        msg.set_boundary(boundary)
    return msg


def check_mime_message(
    data: bytes,
    rcpt: Sequence[str],
    recipient: str,
    header_names: Iterable[str] | None = None,
) -> None:
    """The one-recipient rules on the exact bytes of one SMTP message and its envelope.

    Exactly one envelope recipient, equal to ``recipient`` (the personalization's own address);
    one ``To:`` holding exactly that one address; no Cc/Bcc (nor Resent-*); CRLF line ends only
    and no line over 998 characters; every header line a field or a continuation; and, given
    ``header_names``, exactly the headers that were set: a CR/LF smuggled into a value or a name
    would show as one more. Raises ``EnvelopeViolation``.
    """
    envelope = _one_envelope_recipient(rcpt, recipient)
    if _BARE_CR_OR_LF.search(data):
        raise EnvelopeViolation("the message has a bare CR or LF (a line break smuggled in)")
    head, separator, _ = data.partition(b"\r\n\r\n")
    if not separator:
        raise EnvelopeViolation("the message has no end of its header section")
    if any(len(line) > MAX_LINE_LENGTH for line in data.split(b"\r\n")):
        raise EnvelopeViolation(f"the message has a line over {MAX_LINE_LENGTH} characters")
    for n, line in enumerate(head.split(b"\r\n")):
        continuation = line[:1] in (b" ", b"\t")
        if (continuation and n == 0) or (not continuation and not _FIELD_LINE.match(line)):
            raise EnvelopeViolation(
                f"header line {n + 1} is neither a header field nor a continuation"
            )
    parsed = BytesParser(policy=email_policy.default).parsebytes(data)
    names = [str(k).lower() for k in parsed]
    if forbidden := sorted(FORBIDDEN_HEADERS.intersection(names)):
        raise EnvelopeViolation(f"the message sets {forbidden}")
    for name in SINGLE_HEADERS:
        if names.count(name) > 1:
            raise EnvelopeViolation(f"the message has {names.count(name)} {name!r} headers")
    if header_names is not None and Counter(names) != Counter(n.lower() for n in header_names):
        extra = sorted((Counter(names) - Counter(n.lower() for n in header_names)).keys())
        raise EnvelopeViolation(
            f"the message's headers are not the ones that were set (extra: {extra})"
        )
    to_header: Any = parsed.get("To")
    addresses: tuple[Address, ...] = tuple(getattr(to_header, "addresses", None) or ())
    if to_header is None or getattr(to_header, "defects", None) or len(addresses) != 1:
        raise EnvelopeViolation(
            f"'To:' holds {len(addresses)} addresses (or cannot be read), not exactly 1"
        )
    (to,) = addresses
    if to.addr_spec.lower() != envelope.lower():
        raise EnvelopeViolation("'To:' is not the envelope recipient")
    if "@" in to.display_name:
        raise EnvelopeViolation("the display name in 'To:' could hide an address")
    from_header = parsed.get("From")
    if from_header is None or len(getattr(from_header, "addresses", ())) != 1:
        raise EnvelopeViolation("'From:' does not hold exactly one address")


def _one_envelope_recipient(rcpt: Sequence[str], recipient: str) -> str:
    """The one envelope recipient, which must be the personalization's own address."""
    if len(rcpt) != 1:
        raise EnvelopeViolation(f"the message has {len(rcpt)} envelope recipients, not 1")
    envelope = rcpt[0]
    if not is_valid_single_address(envelope):
        raise EnvelopeViolation("the envelope recipient is not exactly one valid address")
    if envelope.lower() != recipient.lower():
        raise EnvelopeViolation("the envelope recipient is not the personalization's address")
    return envelope


def _address(entry: Any) -> Address:
    if not isinstance(entry, Mapping) or not is_valid_single_address(entry.get("email")):
        raise ValueError("not exactly one valid address")
    name = entry.get("name") or ""
    return Address(display_name=str(name), addr_spec=str(entry["email"]))


def _set_header(msg: EmailMessage, name: str, value: str) -> None:
    """A header as given: an ASCII value is written as it is (folded at its commas, never
    encoded), anything else through the email package (RFC 2047)."""
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"header name {name!r} is not a header field name")
    if not _PRINTABLE_ASCII.fullmatch(value):
        msg[name] = value  # the email package refuses CR/LF here
        return
    msg.set_raw(name, _folded_at_commas(name, value))


def _folded_at_commas(name: str, value: str) -> str:
    """A printable ASCII value folded at its ``", "`` separators to stay within 78 columns
    where it can, as it is written after ``name: ``."""
    lines = [f"{name}: "]
    for n, part in enumerate(value.split(", ")):
        piece = part if n == 0 else ", " + part
        if n and len(lines[-1]) + len(piece) > 78:
            lines[-1] += ","
            piece = " " + part
            lines.append("")
        lines[-1] += piece
    return "\r\n".join(lines)[len(name) + 2 :]


def _content(body: Mapping[str, Any], content_type: str) -> str | None:
    for block in body.get("content") or []:
        if isinstance(block, Mapping) and str(block.get("type", "")).lower() == content_type:
            value = block.get("value")
            return value if isinstance(value, str) else None
    return None


def _render(name: str, value: Any) -> bytes:
    """One header line, exactly as ``msg[name] = value`` and the generator would write it."""
    return MESSAGE_POLICY.fold_binary(*MESSAGE_POLICY.header_store_parse(name, value))


def _encoded(text: str, qp_lines: dict[bytes, str]) -> tuple[str, bytes]:
    """A text part's Content-Transfer-Encoding and its payload as written (CRLF line ends): the
    choice and encoding ``set_content`` makes for a ``str`` in UTF-8 under ``MESSAGE_POLICY``
    (7bit or 8bit when no line is over 78 octets, else whichever of quoted-printable and base64
    is shorter on the first ten lines). Quoted-printable lines are encoded one by one, each as
    the package encodes it, and kept in ``qp_lines``: a template's lines repeat. The
    quoted-printable length of the first ten lines is summed from those lines (the package
    encodes them with ``\n`` soft breaks where these have CRLF), not encoded again."""
    lines = text.encode("utf-8").splitlines()
    maxlen = MESSAGE_POLICY.max_line_length or 78
    if max(map(len, lines), default=0) <= maxlen:
        data = b"\r\n".join(lines) + b"\r\n"
        return ("7bit" if data.isascii() else "8bit"), data
    qps = [_quoted_printable(line, qp_lines) for line in lines]
    head = lines[:10]
    sniff_qp = sum(len(q) - q.count("\r\n") for q in qps[:10]) + len(head)
    sniff_base64 = 4 * ((sum(map(len, head)) + 2 * len(head) + 2) // 3) + 1
    if sniff_qp > sniff_base64:
        return "base64", _base64_lines(b"\r\n".join(lines) + b"\r\n", maxlen)
    return "quoted-printable", ("\r\n".join(qps) + "\r\n").encode("ascii")


def _quoted_printable(line: bytes, qp_lines: dict[bytes, str]) -> str:
    """``quoted_printable_line`` at 78 columns, kept in ``qp_lines`` (lines repeat)."""
    if (qp := qp_lines.get(line)) is None:
        if len(qp_lines) >= _QP_LINES_KEPT:
            qp_lines.clear()
        qp = qp_lines[line] = quoted_printable_line(line, MESSAGE_POLICY.max_line_length or 78)
    return qp


def quoted_printable_line(line: bytes, maxlen: int) -> str:
    """One line (no line break in it) encoded as ``quoprimime.body_encode`` encodes it, soft
    breaks as CRLF. A line of printable ASCII and tabs, the common case, is quoted with one
    ``replace`` (only ``=`` needs quoting in it) instead of a character-by-character
    ``translate``; the soft line breaks are placed by ``body_encode``'s own rules."""
    if not _QP_PLAIN_LINE.fullmatch(line):
        return quoprimime.body_encode(line.decode("latin-1"), maxlen, "\r\n")
    if not line:
        return ""
    quoted = line.decode("ascii").replace("=", "=3D")
    pieces = []
    start = 0
    laststart = len(quoted) - 1 - maxlen
    maxlen1 = maxlen - 1
    while start <= laststart:
        stop = start + maxlen1
        if quoted[stop - 2] == "=":
            pieces.append(quoted[start : stop - 1])
            start = stop - 2
        elif quoted[stop - 1] == "=":
            pieces.append(quoted[start:stop])
            start = stop - 1
        else:
            pieces.append(quoted[start:stop] + "=")
            start = stop
    if quoted[-1] in " \t":
        room = start - laststart
        last = quoprimime.quote(quoted[-1])
        if room >= 3:
            tail = last
        elif room == 2:
            tail = quoted[-1] + "=\r\n"
        else:
            tail = "=\r\n" + last
        pieces.append(quoted[start:-1] + tail)
    else:
        pieces.append(quoted[start:])
    return "\r\n".join(pieces)


class _PartTemplate:
    """One content part of a body, ready for each personalization's substitutions: its lines as
    the package splits them (CR, LF, CRLF), and, for each set of substitution keys, which lines
    hold one (``_Plan``). Only those lines are substituted and encoded per message, and put
    between the others, which are joined and encoded once. A value or key holding a line break
    (it would move the lines) takes the whole-text path, ``_encoded``."""

    def __init__(self, text: str, qp_lines: dict[bytes, str]) -> None:
        self.text = text
        self._qp_lines = qp_lines
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError:
            self._lines: list[bytes] | None = None  # refused per message, as the package does
        else:
            self._lines = raw.splitlines()
        self._plans: dict[tuple[str, ...], _Plan] = {}

    def encoded(self, substitutions: Mapping[str, Any]) -> tuple[str, bytes]:
        """``_encoded(apply_substitutions(text, substitutions))``, made line by line."""
        keys = tuple(substitutions)
        if (
            not self._lines
            or any(not isinstance(v, str) or "\r" in v or "\n" in v for v in substitutions.values())
            or any("\r" in k or "\n" in k for k in keys)
        ):
            return _encoded(apply_substitutions(self.text, substitutions), self._qp_lines)
        if (plan := self._plans.get(keys)) is None:
            plan = _Plan(self._lines, keys)
            if len(self._plans) < 16:
                self._plans[keys] = plan
        try:
            made = [apply_substitutions(s, substitutions).encode("utf-8") for s in plan.sources]
        except UnicodeEncodeError:  # refused as the whole text is: the same words, position
            return _encoded(apply_substitutions(self.text, substitutions), self._qp_lines)
        maxlen = MESSAGE_POLICY.max_line_length or 78
        longest = max(plan.static_longest, max(map(len, made), default=0))
        if longest <= maxlen:
            data = plan.join(plan.raw, [line + b"\r\n" for line in made])
            ascii_only = plan.raw_ascii and all(line.isascii() for line in made)
            return ("7bit" if ascii_only else "8bit"), data
        qps = [_quoted_printable(line, self._qp_lines) for line in made]
        static_qp, static_head_qp = plan.quoted_printable()
        head = plan.head_dynamic
        sniff_qp = (
            static_head_qp + sum(len(q) - q.count("\r\n") for q in qps[:head]) + plan.head_count
        )
        head_octets = plan.static_head_octets + sum(map(len, made[:head]))
        sniff_base64 = 4 * ((head_octets + 2 * plan.head_count + 2) // 3) + 1
        if sniff_qp > sniff_base64:
            data = plan.join(plan.raw, [line + b"\r\n" for line in made])
            return "base64", _base64_lines(data, maxlen)
        return "quoted-printable", plan.join(static_qp, [q.encode("ascii") + b"\r\n" for q in qps])


class _Plan:
    """A part's lines for one set of substitution keys: the lines holding a key (``dynamic``,
    their text in ``sources``) and, between them, the others joined once, each with its CRLF
    (``raw``, and ``quoted_printable()`` when a message needs that encoding); and what the
    encoding choice reads of the first ten lines that does not change per message."""

    def __init__(self, lines: list[bytes], keys: tuple[str, ...]) -> None:
        present = [k.encode("utf-8", "surrogatepass") for k in keys if k]
        self.lines = lines
        self.dynamic = [i for i, line in enumerate(lines) if any(k in line for k in present)]
        self.sources = [lines[i].decode("utf-8") for i in self.dynamic]
        dynamic = set(self.dynamic)
        static = [i for i in range(len(lines)) if i not in dynamic]
        self.static_longest = max((len(lines[i]) for i in static), default=0)
        self.raw = self._segments([line + b"\r\n" for line in lines])
        self.raw_ascii = all(lines[i].isascii() for i in static)
        self.head_count = min(10, len(lines))
        self.head_dynamic = sum(1 for i in self.dynamic if i < 10)
        self.static_head_octets = sum(len(lines[i]) for i in static if i < 10)
        self._qp: tuple[list[bytes], int] | None = None

    def _segments(self, pieces: list[bytes]) -> list[bytes]:
        """The pieces of the lines between the dynamic ones, joined: one more than those."""
        bounds = [-1, *self.dynamic, len(pieces)]
        return [b"".join(pieces[a + 1 : b]) for a, b in pairwise(bounds)]

    def quoted_printable(self) -> tuple[list[bytes], int]:
        """The static lines quoted-printable (joined as ``raw``), and the quoted-printable
        length the encoding choice counts of the static ones among the first ten."""
        if self._qp is None:
            qps = [
                quoted_printable_line(line, MESSAGE_POLICY.max_line_length or 78)
                for line in self.lines
            ]
            dynamic = set(self.dynamic)
            head = sum(len(q) - q.count("\r\n") for i, q in enumerate(qps[:10]) if i not in dynamic)
            self._qp = self._segments([(q + "\r\n").encode("ascii") for q in qps]), head
        return self._qp

    @staticmethod
    def join(segments: list[bytes], made: list[bytes]) -> bytes:
        """The segments with each made line put between them, in order."""
        pieces = [segments[0]]
        for line, segment in zip(made, segments[1:], strict=True):
            pieces += (line, segment)
        return b"".join(pieces)


def _base64_lines(data: bytes, maxlen: int) -> bytes:
    """``data`` in base64 as the package writes a part: lines of ``maxlen // 4 * 3`` octets
    encoded, each ending in CRLF (one encoding of the whole, cut into those lines: the octets per
    line are a multiple of three, so the pieces encode alike)."""
    width = maxlen // 4 * 4
    encoded = binascii.b2a_base64(data, newline=False)
    return b"".join(encoded[i : i + width] + b"\r\n" for i in range(0, len(encoded), width))


@dataclass(frozen=True)
class TemplateSeed:
    """What makes a template's messages the same bytes each time they are made: the date, the
    MIME boundary, and the stamp and token its Message-IDs are made of."""

    date: str
    boundary: str
    stamp: int
    token: int

    @staticmethod
    def new() -> TemplateSeed:
        """A seed for messages made now: this moment's date and a random boundary and token."""
        return TemplateSeed(
            formatdate(usegmt=True), _new_boundary(), int(time.time() * 100), secrets.randbits(63)
        )

    def message_id(self, index: int, domain: str) -> str:
        """Personalization ``index``'s Message-ID (unique: the token is this seed's own)."""
        return f"<{self.stamp}.{index}.{self.token}@{domain}>"


class MessageTemplate:
    """The messages of one request body, made by splicing: what they share is made once, each
    personalization's own pieces are rendered and put in. ``message(index, message_id)`` gives
    the same bytes as ``build_mime_message(body, index, message_id, date=…, boundary=…)`` with
    the seed's date and boundary, and raises the same ``EnvelopeViolation``.

    A body whose headers touch the MIME structure (a ``Content-*`` or ``MIME-Version`` header,
    which ``set_content`` removes or keeps), or a part whose payload holds the boundary, is built
    by the reference builder instead: same bytes, only slower.
    """

    def __init__(self, body: Mapping[str, Any], seed: TemplateSeed | None = None) -> None:
        self.body = body
        self.seed = seed if seed is not None else TemplateSeed.new()
        self.date = self.seed.date
        self.boundary = self.seed.boundary
        self._subject = str(body.get("subject") or "")
        text, html = _content(body, "text/plain"), _content(body, "text/html")
        self._qp_lines: dict[bytes, str] = {}
        self._text = None if text is None else _PartTemplate(text, self._qp_lines)
        self._html = None if html is None else _PartTemplate(html, self._qp_lines)
        self._shared_headers = body.get("headers") or {}
        self._shared: dict[str, bytes] = {}
        self._rendered: dict[tuple[str, str], bytes] = {}
        self._skeletons: dict[tuple[str | None, str | None], list[bytes]] = {}

    def message(self, index: int, message_id: str) -> tuple[bytes, list[str]]:
        """Personalization ``index``'s message (its exact bytes) and the names of the headers
        set on it, in order."""
        body = self.body
        item = body["personalizations"][index]
        substitutions = item.get("substitutions") or {}
        headers = {**self._shared_headers, **(item.get("headers") or {})}
        if any(_touches_mime(str(name)) for name in headers):
            return self._reference(index, message_id)
        try:
            lines = [self._once("From", lambda: _render("From", _address(body["from"])))]
            lines.append(self._to_line(item["to"][0]))
            names = ["From", "To"]
            if body.get("reply_to"):
                lines.append(
                    self._once("Reply-To", lambda: _render("Reply-To", _address(body["reply_to"])))
                )
                names.append("Reply-To")
            lines.append(self._kept("Subject", apply_substitutions(self._subject, substitutions)))
            lines.append(self._once("Date", lambda: _render("Date", self.date)))
            if _PLAIN_MESSAGE_ID.fullmatch(message_id) and len(message_id) <= 66:
                lines.append(f"Message-ID: {message_id}\r\n".encode("ascii"))
            else:
                lines.append(_render("Message-ID", message_id))
            names += ["Subject", "Date", "Message-ID"]
            for key, raw in headers.items():
                name, value = str(key), str(raw)
                if not _FIELD_NAME.fullmatch(name):
                    raise ValueError(f"header name {name!r} is not a header field name")
                if _PRINTABLE_ASCII.fullmatch(value):
                    lines.append(self._kept_raw(name, value))
                else:
                    max_count = MESSAGE_POLICY.header_max_count(name)
                    lowered = name.lower()
                    if max_count and sum(n.lower() == lowered for n in names) >= max_count:
                        raise ValueError(
                            f"There may be at most {max_count} {name} headers in a message"
                        )
                    lines.append(self._kept(name, value))
                names.append(name)
            text_cte, text_data = (
                (None, b"") if self._text is None else self._text.encoded(substitutions)
            )
            html_cte, html_data = (
                (None, b"") if self._html is None else self._html.encoded(substitutions)
            )
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise EnvelopeViolation(
                f"personalization {index}: cannot build its message: {exc}"
            ) from exc
        if text_cte is None and html_cte is None:
            return b"".join(lines) + b"\r\n", names
        mark = f"--{self.boundary}".encode("ascii")
        if text_cte and html_cte and (mark in text_data or mark in html_data):
            return self._reference(index, message_id)
        skeleton = self._skeleton(text_cte, html_cte)
        payloads = [d for d, c in ((text_data, text_cte), (html_data, html_cte)) if c is not None]
        spliced = [skeleton[0]]
        for payload, after in zip(payloads, skeleton[1:], strict=True):
            spliced += [payload, after]
        names += _skeleton_names(text_cte, html_cte)
        return b"".join(lines) + b"".join(spliced), names

    def _reference(self, index: int, message_id: str) -> tuple[bytes, list[str]]:
        msg = build_mime_message(self.body, index, message_id, date=self.date)
        try:
            data = msg.as_bytes(policy=MESSAGE_POLICY)
        except (ValueError, TypeError, UnicodeError) as exc:
            raise EnvelopeViolation(f"personalization {index}: cannot serialise: {exc}") from exc
        return data, list(msg.keys())

    def _to_line(self, entry: Any) -> bytes:
        if (
            isinstance(entry, Mapping)
            and not entry.get("name")
            and isinstance(email := entry.get("email"), str)
            and len(email) <= 74
            and _PLAIN_ADDRESS.fullmatch(email)
            and is_valid_single_address(email)
        ):
            return f"To: {email}\r\n".encode("ascii")
        return _render("To", _address(entry))

    def _once(self, name: str, render: Callable[[], bytes]) -> bytes:
        if (line := self._shared.get(name)) is None:
            line = self._shared[name] = render()
        return line

    def _kept(self, name: str, value: str) -> bytes:
        if (line := self._rendered.get((name, value))) is None:
            if len(self._rendered) >= _RENDERED_KEPT:
                self._rendered.clear()
            line = self._rendered[(name, value)] = _render(name, value)
        return line

    def _kept_raw(self, name: str, value: str) -> bytes:
        key = (f"\0{name}", value)
        if (line := self._rendered.get(key)) is None:
            if len(self._rendered) >= _RENDERED_KEPT:
                self._rendered.clear()
            line = f"{name}: {_folded_at_commas(name, value)}\r\n".encode("ascii")
            self._rendered[key] = line
        return line

    def _skeleton(self, text_cte: str | None, html_cte: str | None) -> list[bytes]:
        """The MIME headers and the part boundaries for these encodings, as the email package
        writes them, cut where each part's payload goes."""
        key = (text_cte, html_cte)
        if (pieces := self._skeletons.get(key)) is not None:
            return pieces
        msg = EmailMessage(policy=MESSAGE_POLICY)
        if text_cte is not None:
            msg.set_content(_MARK, subtype="plain", cte=text_cte)
        if html_cte is not None:
            if text_cte is None:
                msg.set_content(_MARK, subtype="html", cte=html_cte)
            else:
                msg.add_alternative(_MARK, subtype="html", cte=html_cte)
        if msg.is_multipart():
            msg.set_boundary(self.boundary)
        data = msg.as_bytes(policy=MESSAGE_POLICY)
        marks = [_encoded_mark(c) for c in (text_cte, html_cte) if c is not None]
        pieces = []
        for mark in marks:
            head, found, data = data.partition(mark)
            if not found:
                raise AssertionError("the MIME skeleton lost its part")  # pragma: no cover
            pieces.append(head)
        pieces.append(data)
        self._skeletons[key] = pieces
        return pieces


_MARK = "MAILROOM-PART-PAYLOAD"


def _encoded_mark(cte: str) -> bytes:
    if cte == "base64":
        return binascii.b2a_base64(f"{_MARK}\r\n".encode("ascii"))[:-1] + b"\r\n"
    return f"{_MARK}\r\n".encode("ascii")


def _skeleton_names(text_cte: str | None, html_cte: str | None) -> list[str]:
    """The top-level headers ``set_content``/``add_alternative`` add."""
    if text_cte is not None and html_cte is not None:
        return ["MIME-Version", "Content-Type"]
    return ["Content-Type", "Content-Transfer-Encoding", "MIME-Version"]


def _touches_mime(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith("content-") or lowered == "mime-version"


def _new_boundary() -> str:
    return "=" * 15 + str(secrets.randbits(63)).rjust(19, "0") + "=="


class MimeGuard:
    """The MIME guard for every message: ``check(data, rcpt, recipient, header_names)``.

    It reads the exact bytes once, without the ``email`` package, and decides what it can read
    simply; a ``To:`` that is not just the envelope address, or a ``From:`` it has not yet seen
    read as one address, sends the message to the full guard (``check_mime_message``). It
    refuses what the full guard refuses, with the same words.
    """

    def __init__(self) -> None:
        self._one_address_from: set[bytes] = set()

    def check(
        self, data: bytes, rcpt: Sequence[str], recipient: str, header_names: Iterable[str]
    ) -> None:
        envelope = _one_envelope_recipient(rcpt, recipient)
        # Every CR in a CRLF and every LF in one: none is left once the lines are cut at CRLF.
        lines = data.split(b"\r\n")
        rest = b"".join(lines)
        if b"\r" in rest or b"\n" in rest:
            raise EnvelopeViolation("the message has a bare CR or LF (a line break smuggled in)")
        head, separator, _ = data.partition(b"\r\n\r\n")
        if not separator:
            raise EnvelopeViolation("the message has no end of its header section")
        if max(map(len, lines)) > MAX_LINE_LENGTH:
            raise EnvelopeViolation(f"the message has a line over {MAX_LINE_LENGTH} characters")
        fields: list[list[bytes]] = []
        for n, line in enumerate(head.split(b"\r\n")):
            if line[:1] in (b" ", b"\t"):
                if n == 0:
                    raise EnvelopeViolation(
                        "header line 1 is neither a header field nor a continuation"
                    )
                fields[-1].append(line)
            elif _FIELD_LINE.match(line):
                fields.append([line])
            else:
                raise EnvelopeViolation(
                    f"header line {n + 1} is neither a header field nor a continuation"
                )
        names: list[str] = []
        values: dict[str, bytes] = {}
        for field in fields:
            raw_name, _, value = b"".join(field).partition(b":")
            lowered = raw_name.decode("ascii").lower()
            names.append(lowered)
            values[lowered] = value
        if forbidden := sorted(FORBIDDEN_HEADERS.intersection(names)):
            raise EnvelopeViolation(f"the message sets {forbidden}")
        counted = Counter(names)
        for single in SINGLE_HEADERS:
            if counted[single] > 1:
                raise EnvelopeViolation(f"the message has {counted[single]} {single!r} headers")
        expected = Counter(n.lower() for n in header_names)
        if counted != expected:
            extra = sorted((counted - expected).keys())
            raise EnvelopeViolation(
                f"the message's headers are not the ones that were set (extra: {extra})"
            )
        to = values.get("to", b"").strip(b" \t")
        sender = values.get("from", b"")
        if to.decode("ascii", "replace").lower() == envelope.lower() and (
            sender in self._one_address_from
        ):
            return
        check_mime_message(data, rcpt, recipient, header_names)
        self._one_address_from.add(sender)
