"""The benchmarks' SMTP sink (``bench/smtp_sink.py``) and bare pipelined client
(``bench/bare_smtp.py``): the sink speaks SMTP in order whatever the reads' split, counts what
it accepted and writes it on SIGTERM; the client delivers exactly what it was given. No timing
is asserted."""

from __future__ import annotations

import json
import smtplib
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bare_smtp  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
from smtp_sink import SmtpSink, to_addresses  # noqa: E402

pytestmark = pytest.mark.unit

GROUP = b"MAIL FROM:<news@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
MESSAGE = b"From: news@example.test\r\nTo: B <b@example.test>\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SmtpSink]:
    started = SmtpSink(tmp_path / "stats.json", log_file=tmp_path / "sink.log").start()
    try:
        yield started
    finally:
        started.stop()


class Client:
    """A raw socket that reads complete replies (their codes) and nothing more."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buffer = b""
        self.lines: list[bytes] = []

    def codes(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                chunk = self.sock.recv(65536)
                assert chunk, "the sink closed the connection"
                self.buffer += chunk
                continue
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            self.lines.append(line)
            if line[3:4] != b"-":
                out.append(int(line[:3]))
        return out

    def nothing_pending(self, wait: float = 0.15) -> bool:
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return not self.buffer
        finally:
            self.sock.settimeout(5)
        self.buffer += chunk
        return False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def greeted(port: int) -> Client:
    client = Client(port)
    assert client.codes(1) == [220]
    client.send(b"EHLO test.invalid\r\n")
    assert client.codes(1) == [250]
    return client


def test_ehlo_advertises_pipelining_and_a_pipelined_group_is_answered_in_order(
    sink: SmtpSink,
) -> None:
    client = greeted(sink.port)
    assert b"250-PIPELINING" in client.lines
    client.send(GROUP)  # MAIL, RCPT, DATA in one write
    assert client.codes(3) == [250, 250, 354]
    # The end of one message's data and the next transaction in one write.
    client.send(MESSAGE + b".\r\n" + GROUP.replace(b"<b@", b"<c@"))
    assert client.codes(4) == [250, 250, 250, 354]
    client.send(MESSAGE.replace(b"<b@", b"<c@") + b".\r\nQUIT\r\n")
    assert client.codes(2) == [250, 221]
    client.close()
    stats = sink.stop()
    assert stats is not None
    assert (stats["messages"], stats["recipients"], stats["distinct_recipients"]) == (2, 2, 2)
    assert stats["to_mismatch"] == 0
    assert stats["data_bytes"] == 2 * len(MESSAGE)


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_terminator_split_across_two_writes(sink: SmtpSink, cut: int) -> None:
    client = greeted(sink.port)
    client.send(GROUP)
    assert client.codes(3) == [250, 250, 354]
    # A dot-stuffed line and a line starting with a dot are data, not the end.
    data = MESSAGE + b"..\r\n.x\r\n"
    wire = data + b".\r\n"
    split = len(data) - 2 + cut  # inside "\r\n.\r\n"
    client.send(wire[:split])
    assert client.nothing_pending(), "answered before the whole terminator arrived"
    client.send(wire[split:] + b"QUIT\r\n")
    assert client.codes(2) == [250, 221]
    stats = sink.stop()
    assert stats is not None
    assert stats["messages"] == 1
    assert stats["data_bytes"] == len(data)


def test_a_large_message_in_many_writes_is_counted_whole(sink: SmtpSink) -> None:
    client = greeted(sink.port)
    client.send(GROUP)
    assert client.codes(3) == [250, 250, 354]
    line = b"x" * 998 + b"\r\n"
    data = MESSAGE + line * 700  # ~700 KB: more than the sink keeps in memory at once
    for start in range(0, len(data), 65_000):
        client.send(data[start : start + 65_000])
    client.send(b".\r\n")
    assert client.codes(1) == [250]
    client.close()
    stats = sink.stop()
    assert stats is not None
    assert (stats["messages"], stats["data_bytes"], stats["to_mismatch"]) == (1, len(data), 0)


def test_commands_out_of_order_and_unknown_ones_are_refused(sink: SmtpSink) -> None:
    client = Client(sink.port)
    assert client.codes(1) == [220]
    client.send(b"MAIL FROM:<a@example.test>\r\n")
    assert client.codes(1) == [503]  # before EHLO
    client.send(b"HELO test.invalid\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert client.codes(3) == [250, 503, 503]
    client.send(b"MAIL FROM:<a@example.test>\r\nDATA\r\nMAIL FROM:<a@example.test>\r\n")
    assert client.codes(3) == [250, 503, 503]  # DATA without RCPT, nested MAIL
    client.send(b"RSET\r\nNOOP\r\nFROB\r\nRCPT TO:<b@example.test>\r\nQUIT\r\n")
    assert client.codes(5) == [250, 250, 500, 503, 221]
    client.close()
    stats = sink.stop()
    assert stats is not None
    assert stats["messages"] == 0
    assert stats["refused_commands"] == 7


def test_smtplib_counts_duplicates_multi_rcpt_and_to_mismatch(sink: SmtpSink) -> None:
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as smtp:
        assert smtp.ehlo()[0] == 250
        assert smtp.has_extn("pipelining")
        assert smtp.has_extn("8bitmime")
        for to in ("a@example.test", "b@example.test", "A@example.test"):
            assert smtp.sendmail("n@example.test", [to], f"To: {to}\r\n\r\nhi\r\n") == {}
        smtp.sendmail(
            "n@example.test",
            ["c@example.test", "d@example.test"],
            "To: c@example.test\r\n\r\nx\r\n",
        )
        smtp.sendmail("n@example.test", ["e@example.test"], "To: Eve <f@example.test>\r\n\r\nx\r\n")
    stats = sink.stop()
    assert stats is not None
    assert stats["messages"] == 5
    assert stats["recipients"] == 6
    assert stats["distinct_recipients"] == 5  # a@ twice, whatever its case
    assert stats["duplicate_recipients"] == 1
    assert stats["extra_deliveries"] == 1
    assert stats["multi_rcpt_transactions"] == 1
    assert stats["to_mismatch"] == 2  # the two-RCPT transaction and the one to f@


def test_stats_file_is_written_on_sigterm_without_any_address(tmp_path: Path) -> None:
    sink = SmtpSink(tmp_path / "stats.json", log_file=tmp_path / "sink.log").start()
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as smtp:
        smtp.sendmail("n@example.test", ["secret.person@example.test"], MESSAGE)
    assert not (tmp_path / "stats.json").exists()  # written on stop only
    assert sink.process is not None
    sink.stop()
    assert sink.process.returncode == 0
    written = (tmp_path / "stats.json").read_text()
    assert json.loads(written)["messages"] == 1
    for text in (written, (tmp_path / "sink.log").read_text()):
        assert "@" not in text
        assert "secret" not in text


def test_to_addresses_reads_the_header_section_only() -> None:
    message = b"Subject: x\r\nTo: One <A@x.test>,\r\n two@x.test\r\n\r\nTo: c@x.test\r\n"
    assert to_addresses(message) == frozenset({b"a@x.test"})
    assert to_addresses(b"To: b@x.test, c@x.test\r\n\r\n") == frozenset({b"b@x.test", b"c@x.test"})
    assert to_addresses(b"Subject: x\r\n\r\nTo: c@x.test\r\n") is None


def test_wire_dot_stuffs_and_ends_with_the_terminator() -> None:
    message = bare_smtp.wire("n@x.test", "r@x.test", b".start\r\nmid\r\n.dot\r\nend")
    assert message.payload == b"..start\r\nmid\r\n..dot\r\nend\r\n.\r\n"
    assert message.envelope == b"MAIL FROM:<n@x.test>\r\nRCPT TO:<r@x.test>\r\nDATA\r\n"


def test_synthetic_messages_have_mailroom_s_shape() -> None:
    messages = bare_smtp.synthetic_messages(3)
    data = messages[1].payload
    assert b"RCPT TO:<user1@example.test>" in messages[1].envelope
    assert b"\r\nTo: user1@example.test\r\n" in data
    assert b"Content-Type: multipart/alternative;" in data
    assert data.count(b"Content-Type: text/") == 2
    assert b"List-Unsubscribe: <https://" in data
    assert b"%%" not in data  # every substitution applied
    assert 5_000 < messages[1].size < 20_000


@pytest.mark.parametrize("connections", [1, 3])
def test_bare_client_delivers_exactly_n_once_each(sink: SmtpSink, connections: int) -> None:
    messages = bare_smtp.synthetic_messages(200)
    done = bare_smtp.send_pipelined(messages, "127.0.0.1", sink.port, connections=connections)
    assert done["pipelined"] is True
    assert done["messages"] == 200
    stats = sink.stop()
    assert stats is not None
    assert stats["connections"] == connections
    assert (stats["messages"], stats["distinct_recipients"]) == (200, 200)
    assert stats["duplicate_recipients"] == stats["multi_rcpt_transactions"] == 0
    assert stats["to_mismatch"] == 0
    assert stats["data_bytes"] == done["data_bytes"]


def test_bare_client_fails_loudly_on_an_unexpected_reply(sink: SmtpSink) -> None:
    bad = bare_smtp.BareMessage(b"MAIL FROM:<n@x.test>\r\nRCPT TO:<>\r\nDATA\r\n", b"x\r\n.\r\n")
    with pytest.raises(bare_smtp.BareSmtpError, match="expected 250, got 501"):
        bare_smtp.send_pipelined([bad], "127.0.0.1", sink.port)


def _entry(sink_stats: dict[str, int], *, all_sent: bool = True) -> dict[str, object]:
    stage = {"rows": 10, "seconds": 1.0, "expected_messages": 10, "all_sent": all_sent}
    return {
        "stages": {"smtp_send": stage, "smtp_bare": {**stage, "seconds": 0.5}},
        "servers": {
            "smtp_send": {"stats": sink_stats, "cpu_seconds": 1.0},
            "smtp_bare": {"stats": sink_stats, "cpu_seconds": 0.5},
        },
    }


def test_the_bench_checks_flag_duplicates_and_unsent_recipients() -> None:
    clean = {"messages": 10, "recipients": 10, "duplicate_recipients": 0}
    assert run.smtp_checks(_entry(clean)) == []
    twice = {**clean, "recipients": 11, "duplicate_recipients": 1}
    problems = run.smtp_checks(_entry(twice, all_sent=False))
    assert any("outbox does not hold every recipient sent" in p for p in problems)
    assert any("duplicate recipients" in p for p in problems)
    assert any("received 10 messages for 11 recipients" in p for p in problems)


def test_the_report_reads_the_smtp_send_against_the_bare_client() -> None:
    entry = _entry({"messages": 10, "recipients": 10, "bytes_per_message": 9000})
    entry["ratios"] = run.ratios(entry)  # type: ignore[arg-type]
    assert entry["ratios"] == {"smtp_send_vs_bare": 0.5}
    text = "\n".join(report.smtp_section(entry))  # type: ignore[arg-type]
    assert "### SMTP to a local sink" in text
    assert "at 50.0 % of the bare pipelined client" in text


def test_bench_stage_sizes_a_shard_of_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "staging" / run.CAMPAIGN / run.RUN_ID / "batches"
    run_dir.mkdir(parents=True)
    batches = [{"index": i, "recipients": 1000 - i} for i in range(10)]
    manifest = {"recipient_count": sum(b["recipients"] for b in batches), "batches": batches}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    whole = run.smtp_context(tmp_path, 0)
    assert (whole["smtp_shard_count"], whole["smtp_messages"]) == (1, manifest["recipient_count"])
    part = run.smtp_context(tmp_path, 2_000)
    assert part["smtp_shard_count"] == 5
    assert part["smtp_messages"] == 1000 + 995  # batches 0 and 5


def test_sink_start_fails_cleanly_on_a_port_in_use(tmp_path: Path, sink: SmtpSink) -> None:
    other = SmtpSink(tmp_path / "other.json", port=sink.port, log_file=tmp_path / "o.log")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="did not start"):
        other.start()
    assert time.monotonic() - t0 < 10
