"""A fast SMTP sink for the benchmarks: a real SMTP server (RFC 5321) that accepts every message
and keeps counts, in a process of its own so that its CPU is not the sender's.

    python bench/smtp_sink.py [--host 127.0.0.1] [--port 0] --stats FILE [--impl fast|aiosmtpd]

It prints one line ``smtp-sink listening on HOST:PORT`` once it accepts connections, and on
SIGTERM (or SIGINT) stops and writes ``FILE``: JSON with the messages, recipients and bytes it
accepted, how many distinct recipients, how many were received more than once, how many
transactions had more than one ``RCPT TO``, and how many messages' ``To:`` header named another
address than the envelope's. It never logs or writes an address.

``--impl fast`` (the default) is an ``asyncio.Protocol`` on uvloop when uvloop can be imported
(plain asyncio otherwise) that speaks EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT and
advertises PIPELINING (RFC 2920), 8BITMIME, SIZE and ENHANCEDSTATUSCODES: a client may send
``MAIL``, ``RCPT`` and ``DATA`` in one write, and the end of one message's data followed by
the next ``MAIL``/``RCPT``/``DATA`` in one write; every command is answered in order and the
replies to one read go out in one write. ``--impl aiosmtpd`` is an ``aiosmtpd`` server with the
same counting, the usual Python sink, kept to measure what the fast one gains.

``SmtpSink`` starts either in a subprocess, waits until it accepts connections, and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

READY_PREFIX = "smtp-sink listening on "
DEFAULT_MAX_SIZE = 50 * 1024 * 1024
MAX_LINE = 4096  # a command line longer than this (without its CRLF) is refused
# Data kept in memory while looking for the end of a message: beyond this the part already
# scanned is dropped (counted, not kept), so a huge message costs bounded memory.
DATA_WINDOW = 256 * 1024
_TO_HEADER = re.compile(rb"(?im)^to[ \t]*:(.*(?:\r\n[ \t].*)*)")
_ANGLE = re.compile(rb"<([^<>]*)>")
_PATH = re.compile(rb"(?i)^(?:MAIL FROM|RCPT TO):\s*<([^<>]*)>(.*)$")
_SIZE_PARAM = re.compile(rb"(?i)(?:^|\s)SIZE=(\d+)")


# --- the counts -----------------------------------------------------------------------------------
@dataclass
class SinkStats:
    """What the sink accepted: messages (ended with ``.`` and answered 250), their envelope
    recipients, the bytes of their data, and how many times each recipient was received (kept
    in memory only, to count distinct and duplicate recipients; never written out)."""

    messages: int = 0
    recipients: int = 0
    data_bytes: int = 0
    multi_rcpt_transactions: int = 0
    to_mismatch: int = 0
    connections: int = 0
    refused_commands: int = 0
    per_recipient: dict[bytes, int] = field(default_factory=dict)

    def accept(self, rcpts: list[bytes], size: int, to_header: frozenset[bytes] | None) -> None:
        """One message accepted for ``rcpts`` (lower-cased addresses)."""
        self.messages += 1
        self.recipients += len(rcpts)
        self.data_bytes += size
        if len(rcpts) > 1:
            self.multi_rcpt_transactions += 1
        seen = self.per_recipient
        for rcpt in rcpts:
            seen[rcpt] = seen.get(rcpt, 0) + 1
        if to_header is None or to_header != frozenset(rcpts):
            self.to_mismatch += 1

    def summary(self, **extra: Any) -> dict[str, Any]:
        """The figures written on stop: counts only, no address."""
        duplicated = sum(1 for n in self.per_recipient.values() if n > 1)
        return {
            "messages": self.messages,
            "recipients": self.recipients,
            "distinct_recipients": len(self.per_recipient),
            "duplicate_recipients": duplicated,
            "extra_deliveries": self.recipients - len(self.per_recipient),
            "multi_rcpt_transactions": self.multi_rcpt_transactions,
            "to_mismatch": self.to_mismatch,
            "data_bytes": self.data_bytes,
            "bytes_per_message": round(self.data_bytes / self.messages) if self.messages else 0,
            "connections": self.connections,
            "refused_commands": self.refused_commands,
            **extra,
        }


def to_addresses(
    data: bytes | bytearray, start: int = 0, stop: int | None = None
) -> frozenset[bytes] | None:
    """The lower-cased addresses of the ``To:`` header of the message in ``data[start:stop]``
    (its header section only, read cheaply: ``<addr>`` where there are angle brackets, else the
    comma-separated values), or None without one."""
    stop = len(data) if stop is None else stop
    end = data.find(b"\r\n\r\n", start, stop)
    head = bytes(data[start : end + 2 if end >= 0 else stop])
    found = _TO_HEADER.search(head)
    if found is None:
        return None
    value = found.group(1).replace(b"\r\n", b"")
    angled = _ANGLE.findall(value)
    if angled:
        return frozenset(a.strip().lower() for a in angled)
    return frozenset(a.strip().lower() for a in value.split(b",") if a.strip())


# --- the fast server ------------------------------------------------------------------------------
class SmtpSinkProtocol(asyncio.Protocol):
    """One SMTP session. Bytes arrive in any split; commands are taken off the buffer line by
    line, message data until its ``CRLF.CRLF``, and all replies to one read leave in one write.

    In data mode the buffer starts with the ``CRLF`` that ended the ``DATA`` command, so the
    terminator is always found as ``CRLF.CRLF`` (an empty message included), wherever the
    reads split it."""

    def __init__(self, stats: SinkStats, hostname: bytes, max_size: int) -> None:
        self.stats = stats
        self.hostname = hostname
        self.max_size = max_size
        self.buffer = bytearray()
        self.transport: asyncio.WriteTransport | None = None
        self.greeted = False
        self.mail_from: bytes | None = None
        self.rcpts: list[bytes] = []
        self.in_data = False
        self.discarding = False  # skipping the rest of an over-long command line
        self.scan_from = 0  # where to look for the terminator next (data mode)
        self.dropped = 0  # data bytes of the current message no longer in the buffer
        self.to_header: frozenset[bytes] | None = None
        self.to_parsed = False
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport: no isinstance check).
        self.transport = cast(asyncio.WriteTransport, transport)
        self.stats.connections += 1
        self.transport.write(b"220 " + self.hostname + b" ESMTP sink ready\r\n")

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.buffer += data
        replies: list[bytes] = []
        while not self.closing:
            if self.in_data:
                if not self._data(replies):
                    break
            elif not self._command(replies):
                break
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))
            if self.closing:
                self.transport.close()

    # data mode -----------------------------------------------------------------------------------
    def _data(self, replies: list[bytes]) -> bool:
        buf = self.buffer
        end = buf.find(b"\r\n.\r\n", self.scan_from)
        if end < 0:
            if not self.to_parsed and buf.find(b"\r\n\r\n", 2) >= 0:
                self._parse_to(len(buf))
            if len(buf) > DATA_WINDOW:
                if not self.to_parsed:
                    self._parse_to(len(buf))
                keep = len(buf) - 4
                self.dropped += keep
                del buf[:keep]
                self.scan_from = 0
            else:
                self.scan_from = max(0, len(buf) - 4)
            return False
        if not self.to_parsed:
            self._parse_to(end + 2)
        size = self.dropped + end  # from after DATA's CRLF to the last line's CRLF, included
        del buf[: end + 5]  # the next command starts right after the terminator
        rcpts = self.rcpts
        if size > self.max_size:
            replies.append(b"552 5.3.4 Message too big\r\n")
        else:
            self.stats.accept(rcpts, size, self.to_header)
            replies.append(b"250 2.0.0 Ok: queued\r\n")
        self._reset()
        return True

    def _parse_to(self, stop: int) -> None:
        """The ``To:`` addresses of the message in the buffer (its data starts at 2)."""
        self.to_header = to_addresses(self.buffer, 2, stop) if self.dropped == 0 else None
        self.to_parsed = True

    # command mode --------------------------------------------------------------------------------
    def _command(self, replies: list[bytes]) -> bool:
        buf = self.buffer
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) > MAX_LINE:
                if not self.discarding:
                    replies.append(b"500 5.5.2 Line too long\r\n")
                    self.stats.refused_commands += 1
                self.discarding = True
                del buf[: len(buf) - 1]  # a CR at the end may start the CRLF
            return False
        if self.discarding:
            self.discarding = False
            del buf[: end + 2]
            return True
        if end > MAX_LINE:
            del buf[: end + 2]
            replies.append(b"500 5.5.2 Line too long\r\n")
            self.stats.refused_commands += 1
            return True
        line = bytes(buf[:end])
        verb = line[:4].upper()
        if verb == b"DATA" and len(line) == 4:
            reply = self._data_command()
            if self.in_data:
                del buf[:end]  # keep the CRLF: data mode starts with it (see the class)
                self.scan_from = 0
            else:
                del buf[: end + 2]
            replies.append(reply)
            return True
        del buf[: end + 2]
        replies.append(self._reply(verb, line))
        return True

    def _reply(self, verb: bytes, line: bytes) -> bytes:
        if verb == b"MAIL":
            return self._mail(line)
        if verb == b"RCPT":
            return self._rcpt(line)
        if verb == b"EHLO" or verb == b"HELO":
            if len(line) < 6 or line[4:5] != b" " or not line[5:].strip():
                return self._refused(b"501 5.5.4 Syntax: " + verb + b" hostname\r\n")
            self._reset()
            self.greeted = True
            if verb == b"HELO":
                return b"250 " + self.hostname + b"\r\n"
            return (
                b"250-" + self.hostname + b"\r\n"
                b"250-PIPELINING\r\n"
                b"250-8BITMIME\r\n"
                b"250-SIZE " + str(self.max_size).encode() + b"\r\n"
                b"250 ENHANCEDSTATUSCODES\r\n"
            )
        if verb == b"RSET" and len(line) == 4:
            self._reset()
            return b"250 2.0.0 Ok\r\n"
        if verb == b"NOOP":
            return b"250 2.0.0 Ok\r\n"
        if verb == b"QUIT" and len(line) == 4:
            self.closing = True
            return b"221 2.0.0 Bye\r\n"
        if verb == b"DATA":
            return self._refused(b"501 5.5.4 Syntax: DATA\r\n")
        return self._refused(b"500 5.5.2 Command not recognized\r\n")

    def _mail(self, line: bytes) -> bytes:
        if not self.greeted:
            return self._refused(b"503 5.5.1 Send EHLO or HELO first\r\n")
        if self.mail_from is not None:
            return self._refused(b"503 5.5.1 Nested MAIL command\r\n")
        path = _PATH.match(line)
        if path is None or line[:10].upper() != b"MAIL FROM:":
            return self._refused(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
        size = _SIZE_PARAM.search(path.group(2))
        if size is not None and int(size.group(1)) > self.max_size:
            return self._refused(b"552 5.3.4 Message size exceeds fixed limit\r\n")
        self.mail_from = path.group(1)
        return b"250 2.1.0 Ok\r\n"

    def _rcpt(self, line: bytes) -> bytes:
        if self.mail_from is None:
            return self._refused(b"503 5.5.1 Need MAIL before RCPT\r\n")
        path = _PATH.match(line)
        if path is None or line[:8].upper() != b"RCPT TO:" or not path.group(1).strip():
            return self._refused(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n")
        self.rcpts.append(path.group(1).strip().lower())
        return b"250 2.1.5 Ok\r\n"

    def _data_command(self) -> bytes:
        if self.mail_from is None:
            return self._refused(b"503 5.5.1 Need MAIL command\r\n")
        if not self.rcpts:
            return self._refused(b"503 5.5.1 Need RCPT command\r\n")
        self.in_data = True
        self.dropped = 0
        self.to_parsed = False
        self.to_header = None
        return b"354 End data with <CR><LF>.<CR><LF>\r\n"

    def _refused(self, reply: bytes) -> bytes:
        self.stats.refused_commands += 1
        return reply

    def _reset(self) -> None:
        self.mail_from = None
        self.rcpts = []
        self.in_data = False
        self.scan_from = 0
        self.dropped = 0


async def serve_fast(
    host: str, port: int, stats: SinkStats, ready: Callable[[str, int], None], max_size: int
) -> None:
    """Serve until cancelled."""
    loop = asyncio.get_running_loop()
    hostname = b"sink.invalid"
    server = await loop.create_server(
        lambda: SmtpSinkProtocol(stats, hostname, max_size), host, port, backlog=512
    )
    bound = server.sockets[0].getsockname()
    ready(str(bound[0]), int(bound[1]))
    async with server:
        await server.serve_forever()


# --- the aiosmtpd sink, for comparison ------------------------------------------------------------
async def serve_aiosmtpd(
    host: str, port: int, stats: SinkStats, ready: Callable[[str, int], None], max_size: int
) -> None:
    """The usual Python sink: an ``aiosmtpd`` server whose handler counts like the fast one."""
    from aiosmtpd.smtp import SMTP

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            content = envelope.original_content or b""
            rcpts = [str(r).lower().encode() for r in envelope.rcpt_tos]
            stats.accept(rcpts, len(content), to_addresses(content))
            return "250 OK"

    handler = Handler()
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        stats.connections += 1
        return SMTP(handler, data_size_limit=max_size, hostname="sink.invalid")

    server = await loop.create_server(factory, host, port, backlog=512)
    bound = server.sockets[0].getsockname()
    ready(str(bound[0]), int(bound[1]))
    async with server:
        await server.serve_forever()


# --- the process ----------------------------------------------------------------------------------
def _loop_name(impl: str, want: str) -> str:
    if want == "asyncio" or impl == "aiosmtpd":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if want == "uvloop":
            raise
        return "asyncio"
    return "uvloop"


def run_sink(host: str, port: int, stats_file: Path, *, impl: str, loop: str, max_size: int) -> int:
    """Serve until SIGTERM or SIGINT, then write the stats file (atomically)."""
    stats = SinkStats()
    loop_name = _loop_name(impl, loop)
    serve = serve_fast if impl == "fast" else serve_aiosmtpd

    def ready(bound_host: str, bound_port: int) -> None:
        print(f"{READY_PREFIX}{bound_host}:{bound_port}", flush=True)

    async def main() -> None:
        task = asyncio.ensure_future(serve(host, port, stats, ready, max_size))
        running = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
    times = os.times()
    summary = stats.summary(
        impl=impl, loop=loop_name, cpu_seconds=round(times.user + times.system, 3)
    )
    tmp = stats_file.with_name(stats_file.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(stats_file)
    print(
        f"smtp-sink: {summary['messages']} messages, {summary['recipients']} recipients, "
        f"{summary['duplicate_recipients']} received more than once",
        file=sys.stderr,
        flush=True,
    )
    return 0


def process_peak_rss_mb(pid: int) -> float | None:
    """A running process's peak RSS (``VmHWM``) in MB; None when it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


@dataclass
class SmtpSink:
    """The sink in a process of its own: ``start`` returns once it accepts connections (its
    port in ``port``), ``stop`` sends SIGTERM and reads the stats it writes."""

    stats_file: Path
    impl: str = "fast"
    loop: str = "auto"
    host: str = "127.0.0.1"
    port: int = 0
    log_file: Path | None = None  # the sink's stderr (its one line of counts); else inherited
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> SmtpSink:
        self.stats_file.unlink(missing_ok=True)
        stderr = self.log_file.open("ab") if self.log_file is not None else None
        self.process = subprocess.Popen(
            [
                *(sys.executable, str(Path(__file__).resolve())),
                *("--host", self.host, "--port", str(self.port), "--stats", str(self.stats_file)),
                *("--impl", self.impl, "--loop", self.loop),
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
        if stderr is not None:
            stderr.close()  # the child has its own copy
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise RuntimeError(f"the SMTP sink did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])
        return self

    def cpu_seconds(self) -> float:
        """User + system CPU time of the sink process so far (``/proc/<pid>/stat``)."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float | None:
        """The sink process's peak RSS (``VmHWM``), while it runs."""
        assert self.process is not None
        return process_peak_rss_mb(self.process.pid)

    def stop(self, timeout: float = 30.0) -> dict[str, Any] | None:
        """SIGTERM, wait, and the stats it wrote (None if it wrote none)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        if not self.stats_file.exists():
            return None
        result: dict[str, Any] = json.loads(self.stats_file.read_text())
        return result

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--stats", type=Path, required=True, help="JSON written on stop")
    parser.add_argument("--impl", choices=("fast", "aiosmtpd"), default="fast")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE)
    args = parser.parse_args(argv)
    return run_sink(
        args.host, args.port, args.stats, impl=args.impl, loop=args.loop, max_size=args.max_size
    )


if __name__ == "__main__":
    raise SystemExit(main())
