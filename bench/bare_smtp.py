"""A bare pipelined SMTP client: the ceiling of an SMTP sink, and the baseline the SMTP send is
read against.

    python bench/bare_smtp.py --sink fast|aiosmtpd [--messages N] [--connections K]
    python bench/bare_smtp.py --port PORT [--host HOST] [--messages N] [--connections K]
    python bench/bare_smtp.py ... --manifest staging/.../manifest.json [--shard-count S]

Every message is built once, up front, before the clock starts, by Mailroom's own message
builder (the bytes its SMTP transport sends: multipart/alternative, text and HTML,
``List-Unsubscribe`` and the other headers a frozen body sets), one envelope recipient each,
each to its own address. From a run's manifest the messages are those of its
frozen SendGrid request bodies (one per personalization, its substitutions applied), so they are
the size of the ones Mailroom sends; without one, synthetic messages of about that size.

``send_pipelined`` sends them over K connections (a thread and a socket each, the messages dealt
out in turn) with RFC 2920 pipelining: ``MAIL``, ``RCPT`` and ``DATA`` in one write, then for
each message its data, the final ``.`` and the next message's ``MAIL``/``RCPT``/``DATA`` in one
write (``sendmsg``, no copy): one round trip per message. A server that does not advertise
PIPELINING gets the commands one at a time, unless ``pipelining="always"``. Nothing else: no
guard, no outbox, no logging. It logs nothing and reports counts and rates only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_WORDS = (
    "Your account got safer and simpler this winter: passkeys, an allow-list for withdrawal "
    "addresses and a notice for every new device. Read the whole update on our website. "
)


@dataclass(frozen=True)
class BareMessage:
    """One message as it goes on the wire: its envelope commands and its dot-stuffed data
    ending with the final ``.``."""

    envelope: bytes  # MAIL FROM, RCPT TO, DATA
    payload: bytes  # the data, dot-stuffed, then ".\r\n"

    @property
    def size(self) -> int:
        """The message's data size as a server counts it (without the final ``.``)."""
        return len(self.payload) - 3


def wire(mail_from: str, rcpt: str, data: bytes) -> BareMessage:
    """``data`` (CRLF line ends) as one SMTP transaction to exactly ``rcpt``."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    envelope = f"MAIL FROM:<{mail_from}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()
    return BareMessage(envelope, stuffed + b".\r\n")


# --- building the messages ------------------------------------------------------------------------
def messages_from_body(body: Mapping[str, Any], *, limit: int | None = None) -> list[BareMessage]:
    """One message per personalization of a frozen SendGrid v3 request body: the very bytes
    Mailroom's SMTP transport makes of it (its ``MessageTemplate``), built before the clock
    starts, so the bare client and the transport put the same messages on the wire."""
    from mailroom.delivery.transports.mime import MessageTemplate, TemplateSeed

    sender = str(body["from"]["email"])
    domain = sender.rpartition("@")[2]
    seed = TemplateSeed.new()
    template = MessageTemplate(body, seed)
    out: list[BareMessage] = []
    for index, item in enumerate(body["personalizations"][:limit]):
        data, _ = template.message(index, seed.message_id(index, domain))
        out.append(wire(sender, str(item["to"][0]["email"]), data))
    return out


def manifest_batches(
    manifest_path: Path, shard_index: int = 0, shard_count: int = 1
) -> list[dict[str, Any]]:
    """The manifest's batches of one shard (batch i in shard ``i mod shard_count``, as
    ``Manifest.shard``), in the manifest's order."""
    manifest = json.loads(manifest_path.read_bytes())
    return [b for b in manifest["batches"] if int(b["index"]) % shard_count == shard_index]


def messages_from_manifest(
    manifest_path: Path,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    limit: int | None = None,
) -> list[BareMessage]:
    """The messages of one shard's frozen bodies (at most ``limit``), in the manifest's order."""
    out: list[BareMessage] = []
    for batch in manifest_batches(manifest_path, shard_index, shard_count):
        left = None if limit is None else limit - len(out)
        if left is not None and left <= 0:
            break
        body = json.loads((manifest_path.parent / batch["file"]).read_bytes())
        out += messages_from_body(body, limit=left)
    return out


def synthetic_messages(count: int, *, domain: str = "example.test") -> list[BareMessage]:
    """``count`` messages of Mailroom's shape and about the size of its English ones, each to an
    address of its own (``user<i>@domain``)."""
    paragraph = (TEXT_WORDS * 3).strip()
    text = "Hello %%first_name%%,\n\n" + "\n\n".join([paragraph] * 6)
    text += "\n\nUnsubscribe: %%unsubscribe_url%%\n"
    html = (
        '<!doctype html><html><body style="margin:0;padding:0;font-family:Arial,sans-serif">'
        + "".join(f'<p style="margin:0 0 16px 0;color:#222222">{paragraph}</p>' for _ in range(6))
        + '<p><a href="%%unsubscribe_url%%" style="color:#555555">Unsubscribe</a></p>'
        + "</body></html>"
    )
    body: dict[str, Any] = {
        "from": {"email": f"news@{domain}", "name": "Example Exchange"},
        "reply_to": {"email": f"support@{domain}"},
        "subject": "%%first_name%%, here is your winter update",
        "content": [{"type": "text/plain", "value": text}, {"type": "text/html", "value": html}],
        "personalizations": [],
    }
    for i in range(count):
        url = f"https://{domain}/unsubscribe?token=t{i:08d}.{secrets.token_urlsafe(16)}"
        body["personalizations"].append(
            {
                "to": [{"email": f"user{i}@{domain}"}],
                "substitutions": {"%%first_name%%": f"Name{i}", "%%unsubscribe_url%%": url},
                "headers": {
                    "List-Unsubscribe": f"<{url}>, <mailto:unsubscribe@{domain}?subject=u{i}>",
                    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                },
            }
        )
    return messages_from_body(body)


# --- sending --------------------------------------------------------------------------------------
class BareSmtpError(RuntimeError):
    """A reply other than the one expected (its code and the command, never its text)."""


class _Replies:
    """Complete SMTP replies off one socket: the code of each final line (``NNN<SP>``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.last_lines: list[bytes] = []

    def expect(self, codes: Sequence[int], what: str) -> None:
        for code in codes:
            got = self.next_code()
            if got != code:
                raise BareSmtpError(f"{what}: expected {code}, got {got}")

    def next_code(self) -> int:
        lines: list[bytes] = []
        while True:
            end = self.buffer.find(b"\r\n")
            while end < 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise BareSmtpError("the server closed the connection")
                self.buffer += chunk
                end = self.buffer.find(b"\r\n")
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            lines.append(line)
            if line[3:4] != b"-":
                self.last_lines = lines
                return int(line[:3])


def _session(
    host: str,
    port: int,
    messages: Sequence[BareMessage],
    pipelining: str,
    ready: threading.Barrier,
    outcome: dict[str, Any],
) -> None:
    """One connection: greet, wait for the others, send its messages, quit."""
    sock = socket.create_connection((host, port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        replies = _Replies(sock)
        replies.expect((220,), "greeting")
        sock.sendall(b"EHLO bare.invalid\r\n")
        replies.expect((250,), "EHLO")
        advertised = any(line[4:].upper() == b"PIPELINING" for line in replies.last_lines)
        pipelined = pipelining == "always" or (pipelining == "auto" and advertised)
        outcome["pipelined"] = pipelined
        ready.wait()
        sent = 0
        if pipelined and messages:
            sock.sendall(messages[0].envelope)
            replies.expect((250, 250, 354), "MAIL, RCPT, DATA")
            for n, message in enumerate(messages):
                following = messages[n + 1] if n + 1 < len(messages) else None
                if following is None:
                    sock.sendall(message.payload)
                    replies.expect((250,), "end of data")
                else:
                    _send_all(sock, [message.payload, following.envelope])
                    replies.expect((250, 250, 250, 354), "end of data, MAIL, RCPT, DATA")
                sent += 1
        else:
            for message in messages:
                for line in message.envelope.split(b"\r\n")[:3]:
                    sock.sendall(line + b"\r\n")
                    replies.expect((354,) if line == b"DATA" else (250,), line[:4].decode())
                sock.sendall(message.payload)
                replies.expect((250,), "end of data")
                sent += 1
        outcome["accepted"] = sent
        outcome["done"] = time.perf_counter()
        sock.sendall(b"QUIT\r\n")
        replies.expect((221,), "QUIT")
    finally:
        sock.close()


def _send_all(sock: socket.socket, buffers: list[bytes]) -> None:
    """Both buffers in one write (``sendmsg``), the rest if the kernel took only part."""
    total = sum(len(b) for b in buffers)
    done = sock.sendmsg(buffers)
    if done < total:
        sock.sendall(b"".join(buffers)[done:])


def send_pipelined(
    messages: Sequence[BareMessage],
    host: str,
    port: int,
    *,
    connections: int = 1,
    pipelining: str = "auto",
) -> dict[str, Any]:
    """Send every message over ``connections`` connections at once (message i on connection
    ``i mod connections``); the clock runs from when every connection has been greeted until
    the last message's 250. Raises ``BareSmtpError`` if any reply is not the expected one."""
    if connections < 1:
        raise ValueError("at least one connection")
    if pipelining not in ("auto", "always", "never"):
        raise ValueError(f"pipelining is auto, always or never, not {pipelining!r}")
    start = threading.Barrier(connections + 1)
    outcomes: list[dict[str, Any]] = [{} for _ in range(connections)]
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            _session(host, port, messages[k::connections], pipelining, start, outcomes[k])
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(connections)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise BareSmtpError(f"{len(errors)} connection(s) failed: {errors[0]}") from errors[0]
    seconds = max(o["done"] for o in outcomes) - t0
    accepted = sum(o["accepted"] for o in outcomes)
    return {
        "seconds": seconds,
        "messages": accepted,
        "messages_per_second": round(accepted / seconds) if seconds > 0 else None,
        "connections": connections,
        "pipelined": all(o["pipelined"] for o in outcomes),
        "data_bytes": sum(m.size for m in messages),
    }


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="an SMTP server already running")
    parser.add_argument(
        "--sink", choices=("fast", "aiosmtpd"), help="start this sink (smtp_sink.py) and use it"
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--pipelining", choices=("auto", "always", "never"), default="always")
    parser.add_argument("--manifest", type=Path, help="a run's manifest.json: its messages")
    parser.add_argument("--shard-count", type=int, default=1)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if (args.port is None) == (args.sink is None):
        parser.error("give --port or --sink")
    t0 = time.perf_counter()
    if args.manifest:
        messages = messages_from_manifest(
            args.manifest, shard_count=args.shard_count, limit=args.messages
        )
    else:
        messages = synthetic_messages(args.messages)
    built = time.perf_counter() - t0
    for k in args.connections:
        figures: dict[str, Any] = {"build_seconds": round(built, 3)}
        if args.sink:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from smtp_sink import SmtpSink

            stats = Path(f"/tmp/bare-smtp-sink-{os.getpid()}.json")
            sink = SmtpSink(stats, impl=args.sink).start()
            try:
                cpu0 = sink.cpu_seconds()
                figures |= send_pipelined(
                    messages, args.host, sink.port, connections=k, pipelining=args.pipelining
                )
                figures["sink_cpu_seconds"] = round(sink.cpu_seconds() - cpu0, 3)
            finally:
                figures["sink"] = sink.stop()
                stats.unlink(missing_ok=True)
        else:
            figures |= send_pipelined(
                messages, args.host, args.port, connections=k, pipelining=args.pipelining
            )
        print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
