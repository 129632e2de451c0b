"""``mailroom-sendgrid-dev``: run the SendGrid stand-in until SIGTERM or SIGINT.

The first line on stdout is ``mailroom-sendgrid-dev listening on <url>``, printed once the port is
bound, so a harness that starts it with ``--port 0`` learns the port without racing for one.
Everything else goes to stderr as log lines holding counts only, never addresses or the key.

``--tls`` serves HTTPS (``https://`` in that line) with a certificate made at start; the PEM a
client must trust is written to ``--tls-ca-file`` (by default a file of the server's own, named
on stderr). ``--latency-ms`` adds a network round trip to every answer and handshake.
"""

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from sendgrid_dev.errors import DevServerError
from sendgrid_dev.faults import Faults
from sendgrid_dev.server import SendGridDevServer

READY_PREFIX = "mailroom-sendgrid-dev listening on "
DEFAULT_PORT = 3030
DEFAULT_LOG_EVERY = 1000

logger = logging.getLogger("sendgrid_dev")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailroom-sendgrid-dev",
        description="A local SendGrid v3 mail-send stand-in that records what it accepts.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="append accepted requests to DIR/accepted.jsonl (default: memory only)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="the only bearer token accepted (default: any non-empty one)",
    )
    network = parser.add_argument_group("the network in between")
    network.add_argument(
        "--tls", action="store_true", help="serve HTTPS with a certificate made at start"
    )
    network.add_argument(
        "--tls-ca-file",
        type=Path,
        metavar="FILE",
        help="write the certificate clients must trust (PEM) to FILE (default: a temporary file)",
    )
    network.add_argument(
        "--tls-name",
        action="append",
        default=[],
        metavar="NAME",
        help="another host name or address the certificate is for (repeatable)",
    )
    network.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="one round trip of MS ms added to every answer and every connection's handshakes",
    )
    faults = parser.add_argument_group("fault injection (0 = off)")
    faults.add_argument(
        "--status-429-every", type=int, default=0, metavar="N", help="every Nth request: 429"
    )
    faults.add_argument(
        "--status-5xx-every", type=int, default=0, metavar="N", help="every Nth: 500/502/503"
    )
    faults.add_argument(
        "--delay-seconds", type=float, default=0.0, metavar="S", help="wait S before answering"
    )
    faults.add_argument(
        "--drop-after-accept-every",
        type=int,
        default=0,
        metavar="N",
        help="every Nth: record it, then close without answering",
    )
    faults.add_argument(
        "--max-requests-per-second",
        type=float,
        default=0.0,
        metavar="R",
        help="answer 429 above R requests per second",
    )
    faults.add_argument(
        "--retry-after-seconds", type=int, default=1, metavar="S", help="Retry-After of a 429"
    )
    faults.add_argument(
        "--hold-until-in-flight",
        type=int,
        default=0,
        metavar="N",
        help="hold answers until N mail-send requests are being answered at once",
    )
    parser.add_argument(
        "--log-every",
        type=int,
        default=DEFAULT_LOG_EVERY,
        metavar="N",
        help="log the counts every N mail-send requests (0 = never)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        faults = Faults(
            status_429_every=args.status_429_every,
            status_5xx_every=args.status_5xx_every,
            delay_seconds=args.delay_seconds,
            drop_after_accept_every=args.drop_after_accept_every,
            max_requests_per_second=args.max_requests_per_second,
            retry_after_seconds=args.retry_after_seconds,
            hold_until_in_flight=args.hold_until_in_flight,
        )
    except DevServerError as error:
        parser.error(str(error))
    if args.log_every < 0:
        parser.error("--log-every must be >= 0")
    if not 0 <= args.latency_ms < float("inf"):
        parser.error("--latency-ms must be a number >= 0")
    if (args.tls_ca_file or args.tls_name) and not args.tls:
        parser.error("--tls-ca-file and --tls-name go with --tls")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    server = SendGridDevServer(
        args.host,
        args.port,
        args.data_dir,
        args.api_key,
        faults,
        log_every=args.log_every,
        tls=args.tls,
        tls_names=tuple(args.tls_name),
        ca_file=args.tls_ca_file,
        latency_ms=args.latency_ms,
    )
    try:
        server.start()
    except (OSError, DevServerError) as error:
        print(
            f"mailroom-sendgrid-dev: cannot start on {args.host}:{args.port}: {error}",
            file=sys.stderr,
        )
        return 1

    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {
        signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        print(f"{READY_PREFIX}{server.url}", flush=True)
        logger.info(
            "recording to %s; faults %s",
            args.data_dir or "memory only",
            faults.to_json(),
        )
        if args.tls:
            logger.info("HTTPS: clients trust the certificate in %s", server.ca_file)
        if args.latency_ms:
            logger.info("adding a %.0f ms round trip to answers and handshakes", args.latency_ms)
        while not stop_requested.wait(0.5):
            pass
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    logger.info("stopped; totals %s", server.stats().to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
