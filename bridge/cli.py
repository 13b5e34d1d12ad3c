"""The ``bridge`` command: serve, check-config, topics, tail, deadletter."""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import dataclasses
import io
import json
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from bridge import logs, package_version
from bridge.auth import UNAUTHENTICATED, short_token_warnings, warn_if_short
from bridge.config import Settings, listen_addresses, load_settings
from bridge.errors import DEAD_LETTER_REASONS, ConfigError, SpoolUnusable
from bridge.routing import Router, template_pattern
from bridge.signals import release_early_stops

if TYPE_CHECKING:  # imported where used: the other commands need no aiokafka
    from bridge.kafkaadmin import DeadLetterQuery

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    global _last_words_logged  # noqa: PLW0603  # one command per process
    serving = args.run is _serve
    if not serving:  # serve takes the stop signals over itself (bridge.server)
        release_early_stops()
        _escape_what_stdout_cannot_encode()
    # Before the settings are read, the format they would give: the default unless
    # the variable says otherwise.
    _last_words_logged = serving and _asks_for_json(os.environ.get("BRIDGE_LOG_FORMAT"))
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        if isinstance(exc.log_format, str):  # read (a file's log_format = "text" too)
            _last_words_logged = serving and _asks_for_json(exc.log_format)
        _say_last(str(exc))
        return 2
    _last_words_logged = serving and settings.log_format == "json"
    # The operator commands run in a terminal: their log lines (the Kafka client's,
    # mostly) as text unless BRIDGE_LOG_FORMAT, or the file's log_format, says json.
    given = serving or "log_format" in settings.model_fields_set
    logs.configure(settings.log_level, settings.log_format if given else "text", background=serving)
    previous = None
    if not serving and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # not ignored
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    stdout = sys.stdout
    if not serving and stdout is not None:  # the operators' output (serve writes none)
        sys.stdout = cast(TextIO, _GuardedStdout(stdout))
    try:
        code: int = args.run(settings, args)
        if sys.stdout is not stdout:  # what is still buffered fails here, said as above
            sys.stdout.flush()
    except (Exception, KeyboardInterrupt) as exc:
        return _exit_code(exc, settings, serving=serving)
    finally:
        sys.stdout = stdout
        if serving and sys.stderr is not None:
            try:
                logs.write_in_place()
                sys.stderr.flush()
            except OSError:  # its reader gone: Python's flush at exit would fail (120)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code


class StdoutFailed(Exception):
    """Stdout could not be written (a full disk under `> file`); its OSError is the
    cause. Told apart from the OSErrors of Kafka's connections: every command's was
    "cannot talk to Kafka", check-config's too."""


class _GuardedStdout:
    """sys.stdout while a command runs, its write failures raised as StdoutFailed (but
    a reader gone: BrokenPipeError has its own handling)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise StdoutFailed from exc

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise StdoutFailed from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _stop_on_sigterm(signum: int, _: object) -> None:
    """SIGTERM stops an operator command as Ctrl-C does: its Kafka clients closed, exit
    143. With the default action, a container's PID 1 (`docker run ... bridge tail`)
    never got it (the kernel drops it), and the command ran on until SIGKILL.
    (`deadletter replay` handles it in its event loop, with its summary.)"""
    raise SystemExit(128 + signum)


def _escape_what_stdout_cannot_encode() -> None:
    """A key or value the terminal's encoding cannot write (Cyrillic on a latin-1 one)
    as \\u escapes: `deadletter list` and `tail` stopped at it with a traceback, where
    `deadletter replay`'s report escaped it. JSON's escapes (backslashreplace's \\xe9
    and \\U0001f389 are not: a --json line was no JSON), which read as well."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors=_JSON_ESCAPE)


def _json_escapes(error: UnicodeError) -> tuple[str, int]:
    """The characters ``error`` could not encode, as JSON writes them: \\uXXXX, a
    surrogate pair beyond U+FFFF."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    escaped = []
    for character in error.object[error.start : error.end]:
        code = ord(character)
        if code > 0xFFFF:
            code -= 0x10000
            escaped.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            escaped.append(f"\\u{code:04x}")
    return "".join(escaped), error.end


_JSON_ESCAPE = "bridge-json-escape"
codecs.register_error(_JSON_ESCAPE, _json_escapes)


#: Whether a failure's last words go out as a JSON log line: see _say_last.
_last_words_logged = False


def _asks_for_json(log_format: str | None) -> bool:
    """Whether a BRIDGE_LOG_FORMAT as given (None: not given) means JSON, the default."""
    return log_format is None or log_format.strip().lower() in {"json", ""}


def _say_last(message: str) -> None:
    """Why a command failed, on stderr: ``bridge: <message>`` for people, or, for serve
    logging JSON, one line in the log's format (level error). A log pipeline that reads
    JSON dropped the plain line, the one that says why the bridge would not start (a
    reviewer: every line valid JSON but that last one)."""
    if _last_words_logged:
        record = logging.makeLogRecord(
            {"name": "bridge", "levelno": logging.ERROR, "levelname": "ERROR", "msg": message}
        )
        line = logs.JsonFormatter().format(record)
    else:
        line = f"bridge: {message}"
    if not logs.put_last(line):  # after the lines serve's log writer holds, if it runs
        print(line, file=sys.stderr)


def _exit_code(exc: BaseException, settings: Settings, *, serving: bool = False) -> int:
    """What a command's failure prints and exits with; raises what is not foreseen."""
    if isinstance(exc, ConfigError | SpoolUnusable):
        _say_last(str(exc))
        return 2
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, BrokenPipeError):  # the reader went away (bridge tail | head)
        # Python flushes stdout again at exit, which would fail the same way.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if isinstance(exc, StdoutFailed):  # a full disk under `> file`: not Kafka's fault
        _say_last(f"cannot write to stdout: {exc.__cause__}")
        with contextlib.suppress(OSError, ValueError):  # Python's flush at exit: not again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if isinstance(exc, OSError | TimeoutError):  # Kafka unreachable or refusing, for the tools
        if isinstance(exc, TimeoutError) and not str(exc):  # an operator tool's deadline
            reason = f"no answer within {settings.kafka_connect_timeout:g} s"
        else:
            reason = str(exc) or type(exc).__name__
        if serving and isinstance(exc, OSError):
            # serve deals with Kafka itself: what reaches here is the machine's (a file,
            # a folder), which "cannot talk to Kafka" sent the operator after (a review)
            _say_last(f"the bridge stopped: {reason}")
        else:
            _say_last(f"cannot talk to Kafka at {settings.kafka_bootstrap}: {reason}")
        return 1
    if type(exc).__module__.startswith("aiokafka"):
        return _kafka_error_code(exc, settings)
    raise exc


def _kafka_error_code(exc: BaseException, settings: Settings) -> int:
    """What an operator command that aiokafka failed prints and exits with."""
    if "Unable to bootstrap" in str(exc):  # no broker let the client in
        refusal, hint = _security_diagnosis(settings)
        if refusal is not None:  # as serve says it: the settings are wrong, not Kafka
            _say_last(refusal)
            return 2
        _say_last(
            f"cannot talk to Kafka at {settings.kafka_bootstrap}: "
            + (
                hint
                or "no broker there answered "
                "(is Kafka running, and is BRIDGE_KAFKA_BOOTSTRAP its address?)"
            )
        )
        return 1
    _say_last(f"Kafka at {settings.kafka_bootstrap}: {str(exc) or type(exc).__name__}")
    return 1


def _security_diagnosis(settings: Settings) -> tuple[str | None, str | None]:
    """Why Kafka refuses the security settings, if it does, and a hint at why it does
    not answer (:func:`bridge.publisher.kafka_diagnosis`). aiokafka's failed bootstrap
    says only "Unable to bootstrap from [...]" for a wrong password or a certificate
    Kafka does not trust, logging the reason a line above: ask again the way serve
    does, so the operator commands name it too."""
    from bridge.publisher import kafka_client_options, kafka_diagnosis  # noqa: PLC0415

    try:
        return asyncio.run(kafka_diagnosis(settings, kafka_client_options(settings)))
    except Exception:  # not foreseen (SCRAM's ValueError, say): the first error is told
        return None, None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bridge", description="Geins webhooks in, Kafka topics out."
    )
    config_help = (
        "TOML settings file (default: $BRIDGE_CONFIG_FILE); BRIDGE_* variables override it"
    )
    parser.add_argument("--config", type=Path, default=None, help=config_help)
    parser.add_argument(  # which one is deployed, without a scrape of bridge_build_info
        "--version", action="version", version=f"%(prog)s {package_version()}"
    )
    # Also after the command (`bridge serve --config f.toml`, as users write it): it
    # was refused there as an unrecognised argument. SUPPRESS: not given, it leaves
    # the value given before the command.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=config_help)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[config], help="run the HTTP ingress")
    serve.set_defaults(run=_serve)

    check = commands.add_parser(
        "check-config", parents=[config], help="validate the settings and print them"
    )
    check.set_defaults(run=_check_config)

    topics = commands.add_parser("topics", parents=[config], help="create or list topics")
    topic_commands = topics.add_subparsers(required=True, metavar="ACTION")
    create = topic_commands.add_parser(
        "create",
        parents=[config],
        help="create the topics of every known Geins event type and the dead-letter topic "
        "(or those named)",
    )
    create.add_argument("names", nargs="*", help="topics to create instead of the known ones")
    create.set_defaults(run=_topics_create)
    listing = topic_commands.add_parser("list", parents=[config], help="list the cluster's topics")
    listing.set_defaults(run=_topics_list)

    dead = commands.add_parser(
        "deadletter", parents=[config], help="inspect or replay refused deliveries"
    )
    dead_commands = dead.add_subparsers(required=True, metavar="ACTION")
    dead_list = dead_commands.add_parser(
        "list", parents=[config], help="show what is on the dead-letter topic"
    )
    _add_reason_option(dead_list)
    dead_list.add_argument(
        "--json", action="store_true", help="a line of JSON per dead letter, for scripts"
    )
    dead_list.set_defaults(run=_deadletter_list)
    replay = dead_commands.add_parser(
        "replay",
        parents=[config],
        help="parse dead letters again with today's settings and publish those now accepted",
    )
    replay.add_argument(
        "--offset",
        type=_position,
        action="append",
        metavar="P:N",
        help="only the record at offset N of partition P, as list shows it (repeat); "
        "N alone when the topic has one partition",
    )
    replay.add_argument("--key", action="append", help="only this idempotency key (repeat)")
    _add_reason_option(replay)
    replay.add_argument("--dry-run", action="store_true", help="say what would happen")
    replay.set_defaults(run=_deadletter_replay)

    tail = commands.add_parser(
        "tail", parents=[config], help="print the records arriving on topics"
    )
    tail.add_argument(
        "topics",
        nargs="*",
        help="topics (with neither these nor --pattern: every topic the template can make)",
    )
    tail.add_argument(
        "--pattern",
        help="every topic this regular expression matches (from the start), with those named",
    )
    tail.add_argument("--from-beginning", action="store_true", help="start at the oldest record")
    tail.add_argument("--limit", type=_at_least_one, help="stop after this many records")
    tail.add_argument("--json", action="store_true", help="a line of JSON per record, for scripts")
    tail.set_defaults(run=_tail)
    return parser


def _add_reason_option(command: argparse.ArgumentParser) -> None:
    """``--reason`` of the deadletter commands. A misspelt reason would match nothing
    and say "0 dead letter(s)", exit 0, as if the topic held none: argparse refuses it,
    naming those there are."""
    command.add_argument(
        "--reason",
        action="append",
        choices=DEAD_LETTER_REASONS,
        metavar="REASON",
        help="only dead letters with this reason (repeat): " + ", ".join(DEAD_LETTER_REASONS),
    )


def _at_least_one(text: str) -> int:
    """``--limit``: a whole number of records, 1 or more."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of records (1 or more)")
    return number


def _router(settings: Settings) -> Router:
    return Router.from_settings(settings)


def _serve(settings: Settings, _: argparse.Namespace) -> int:
    from bridge.server import serve  # noqa: PLC0415  # uvicorn is only needed here

    settings.check_serving()
    warn_if_short(settings.tokens, "BRIDGE_TOKENS")  # the file's: when the bridge reads it
    if (ambiguity := _router(settings).template.ambiguity) is not None:
        log.warning("%s", ambiguity)
    return serve(settings)


def _check_config(settings: Settings, _: argparse.Namespace) -> int:
    from bridge.metrics import Metrics  # noqa: PLC0415  # keep the other commands light
    from bridge.publisher import KafkaPublisher  # noqa: PLC0415
    from bridge.spool import check_folder, spool_refusal  # noqa: PLC0415

    settings.check_serving()
    KafkaPublisher(settings, Metrics())  # checks what only the publisher knows
    # What serve would refuse before listening, checked the same way, but without
    # binding the port (another bridge may hold it now) or making the spool folder.
    listen_addresses(settings.host, settings.port)
    if (ops := settings.ops_address()) is not None:
        listen_addresses(*ops)
    if settings.ack == "durable":
        check_folder(settings.spool_dir)
        if (refusal := spool_refusal(settings.spool_dir)) is not None:
            raise SpoolUnusable(refusal)
    print(json.dumps(settings.redacted(), indent=2))
    beyond_file_limit = settings.connection_limit()[1]
    file_tokens = settings.file_tokens()
    unauthenticated = settings.allow_unauthenticated and not (settings.tokens or file_tokens)
    router = _router(settings)  # the defaults a delivery without account/environment gets
    leftover = _leftover_spool_note(settings)
    for warning in [
        *short_token_warnings(settings.tokens, "BRIDGE_TOKENS"),
        *short_token_warnings(file_tokens, "the tokens file"),
        *([beyond_file_limit] if beyond_file_limit else []),
        *([too_small] if (too_small := settings.file_size_warning()) else []),
        *([UNAUTHENTICATED] if unauthenticated else []),
        *([router.template.ambiguity] if router.template.ambiguity else []),
        *([leftover] if leftover else []),
    ]:
        print(f"warning: {warning}", file=sys.stderr)
    example = router.topic_for(
        "Order", "create", router.default_account, router.default_environment
    )
    # On stderr, with the warnings: stdout is the settings' JSON alone (check-config | jq)
    print(f"settings are valid; an order/create event goes to topic {example}", file=sys.stderr)
    return 0


def _leftover_spool_note(settings: Settings) -> str | None:
    """In broker or memory mode, a spool file a durable bridge left: serve publishes
    what it holds (bridge.leftover). Not opened here (a running bridge may own it)."""
    from bridge.leftover import spool_file  # noqa: PLC0415
    from bridge.spool import spool_refusal  # noqa: PLC0415

    found = None if settings.ack == "durable" else spool_file(settings)
    if found is None:
        return None
    path, unreadable = found
    if unreadable is not None:
        return (
            f"{path} cannot be looked into ({unreadable.strerror}): if a durable bridge's "
            f"spool is there, serve with BRIDGE_ACK={settings.ack} cannot publish it"
        )
    if (refusal := spool_refusal(settings.spool_dir)) is not None:
        return f"{refusal}; serve with BRIDGE_ACK={settings.ack} does not publish what it may hold"
    return (
        f"{path} is a durable bridge's spool: the events it may still hold are published "
        f"by serve with BRIDGE_ACK={settings.ack}, in the background"
    )


def _topics_create(settings: Settings, args: argparse.Namespace) -> int:
    from bridge import kafkaadmin  # noqa: PLC0415

    names = args.names or kafkaadmin.default_topics(settings, _router(settings))
    try:
        results = asyncio.run(kafkaadmin.create_topics(settings, names))
    except kafkaadmin.TopicsNotCreated as exc:
        results = exc.results  # the others were made: say so too
    for name, result in sorted(results.items()):
        outcome, _, why = result.partition(": ")
        print(f"{outcome:8} {name}" + (f"  ({why})" if why else ""))
    return 1 if any(r.startswith("failed") for r in results.values()) else 0


def _topics_list(settings: Settings, _: argparse.Namespace) -> int:
    from bridge import kafkaadmin  # noqa: PLC0415

    for name in asyncio.run(kafkaadmin.list_topics(settings)):
        print(name)
    return 0


def _position(text: str) -> tuple[int | None, int]:
    """``--offset``: ``P:N`` (partition, offset), or ``N`` alone (no partition given)."""
    partition, _, offset = text.rpartition(":")
    try:
        return (int(partition) if partition else None), int(offset)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not PARTITION:OFFSET (such as 2:17, as deadletter list shows [2]@17)"
        ) from None


def _dead_letter_query(settings: Settings, args: argparse.Namespace) -> DeadLetterQuery:
    """What a deadletter command's options ask for."""
    from bridge import kafkaadmin  # noqa: PLC0415

    if not settings.deadletter_topic:
        raise ConfigError("BRIDGE_DEADLETTER_TOPIC is empty: dead letters are not kept")
    return kafkaadmin.DeadLetterQuery(
        offsets=getattr(args, "offset", None) or (),
        keys=frozenset(getattr(args, "key", None) or ()),
        reasons=frozenset(args.reason or ()),
    )


def _deadletter_list(settings: Settings, args: argparse.Namespace) -> int:
    query = _dead_letter_query(settings, args)
    shown = asyncio.run(_show_dead_letters(settings, query, as_json=args.json))
    print(f"{shown} dead letter(s) on {settings.deadletter_topic}", file=sys.stderr)
    return 0


async def _show_dead_letters(settings: Settings, query: DeadLetterQuery, *, as_json: bool) -> int:
    """Print each dead letter ``query`` wants as it is read (two lines for people, or a
    line of JSON); how many there were."""
    from bridge import kafkaadmin  # noqa: PLC0415

    describe = kafkaadmin.record_json if as_json else kafkaadmin.describe_dead_letter
    shown = 0
    async with contextlib.aclosing(kafkaadmin.dead_letters(settings, query)) as letters:
        async for record in letters:
            print(describe(record))
            shown += 1
    return shown


@dataclasses.dataclass
class _ReplayTally:
    """What a replay did so far: its summary, however the replay ends."""

    replayed: int = 0
    refused: int = 0
    unpublished: int = 0  # accepted, but Kafka did not take it
    publishing: str = ""  # the position of the record being published, if one is
    positions: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    report_failure: Exception | None = None  # why the report could not be written
    keys: set[str] = dataclasses.field(default_factory=set)

    def saw(self, partition: int, offset: int, keys: set[str]) -> None:
        """A dead letter the query wanted: where it was and its key (the forms of
        :func:`~bridge.kafkaadmin.key_forms`)."""
        self.positions.add((partition, offset))
        self.keys.update(keys)

    def not_found(self, query: DeadLetterQuery) -> list[str]:
        """The ``--offset`` and ``--key`` values no dead letter the replay told of
        matched: one that matched nothing was left unsaid when another matched."""
        offsets = {offset for _, offset in self.positions}
        missing = [
            f"--offset {'' if partition is None else f'{partition}:'}{offset}"
            for partition, offset in query.offsets
            if (
                (partition, offset) not in self.positions
                if partition is not None
                else offset not in offsets
            )
        ]
        return missing + [f"--key {key}" for key in sorted(query.keys - self.keys)]

    def count(self, result: str) -> None:
        """Count a dead letter by its :attr:`~bridge.kafkaadmin.Replayed.result`."""
        if result == "replayed":
            self.replayed += 1
        elif result == "unpublished":
            self.unpublished += 1
        else:
            self.refused += 1

    @property
    def told(self) -> int:
        """How many dead letters the replay has dealt with (their lines said, or
        waiting for their reader)."""
        return self.replayed + self.refused + self.unpublished

    def summary(self, verb: str) -> str:
        unpublished = f", {self.unpublished} not published" if self.unpublished else ""
        return f"{self.replayed} {verb}, {self.refused} still refused{unpublished}"


def _deadletter_replay(settings: Settings, args: argparse.Namespace) -> int:
    try:
        # The token checks compare with the tokens it knows: with none, a dead letter
        # refused for a token in its entity was published with the token in its topic
        # name, and exited 0. The tokens serve would use, then: a BRIDGE_TOKENS_FILE
        # holding none (only comments) is none either.
        settings.check_serving()
    except ConfigError as exc:
        _say_last(
            f"a replay checks dead letters for the webhook tokens, so it needs those the "
            f"bridge uses, as serve does: {exc}"
        )
        return 2
    query = _dead_letter_query(settings, args)
    tally = _ReplayTally()
    verb = "would be replayed" if args.dry_run else "replayed"
    try:
        asyncio.run(_replay_dead_letters(settings, query, tally, dry_run=args.dry_run))
    except BaseException as exc:
        # Stopped before the end (Kafka away, Ctrl-C, SIGTERM): what was done until then,
        # and the record that may be on Kafka without its line; then the error as
        # always. Not before the first dead letter (a missing topic, say): nothing to
        # tell.
        if tally.publishing:
            from bridge.kafkaadmin import MAYBE_ON_KAFKA  # noqa: PLC0415

            print(
                f"stopped while publishing {tally.publishing}: it may be on Kafka "
                f"({MAYBE_ON_KAFKA})",
                file=sys.stderr,
            )
        if tally.publishing or tally.told:
            print(f"{tally.summary(verb)} before the replay stopped", file=sys.stderr)
        _say_report_failure(tally)
        if isinstance(exc, asyncio.CancelledError):  # SIGTERM (see _replay_dead_letters)
            return 128 + signal.SIGTERM
        raise
    if not tally.told and (args.offset or args.key or args.reason):
        # Nothing replayed that was asked for, as when some are still refused.
        print(f"no dead letter on {settings.deadletter_topic} matches", file=sys.stderr)
        return 1
    print(tally.summary(verb), file=sys.stderr)
    not_found = tally.not_found(query)
    for option in not_found:
        print(f"{option} matches no dead letter on {settings.deadletter_topic}", file=sys.stderr)
    failed = _say_report_failure(tally)
    return 1 if tally.refused or tally.unpublished or not_found or failed else 0


def _say_report_failure(tally: _ReplayTally) -> bool:
    """Say why the report's lines stopped reaching stdout, if they did (a full disk);
    whether they did. A reader that went away is no failure (see _Report)."""
    if tally.report_failure is None:
        return False
    _say_last(f"the report could not be written to stdout: {tally.report_failure}")
    return True


class _Report:
    """A replay's report on stdout, a line per dead letter, written by a thread of its
    own so that the replay never waits inside a write.

    A reader that takes nothing (a paused pager, a stalled log pipe) held the write,
    and the event loop with it: its SIGTERM handler never ran, and the replay went on
    until SIGKILL. Now the loop waits only for room among REPORT_LINES lines not yet
    written, and a SIGTERM (or Ctrl-C) stops it there as anywhere else. A reader that
    went away (`| head`, `less` quit early) does not stop the replay half done,
    exiting 0 without its summary: the rest of the report goes nowhere. Any other
    failure to write (a full disk) is kept in ``failure`` for the exit to say.
    """

    def __init__(self) -> None:
        self._out = sys.stdout  # None when the process has no stdout (`>&-`)
        self._encoding = getattr(self._out, "encoding", None) or "utf-8"
        self._lines: queue.Queue[str | None] = queue.Queue(REPORT_LINES)
        self._gone = self._out is None
        self.failure: Exception | None = None
        self._loop = asyncio.get_running_loop()
        self._written = asyncio.Event()  # every line said, up to finish()
        self._thread = threading.Thread(target=self._write, name="replay-report", daemon=True)
        self._thread.start()

    async def say(self, line: str) -> None:
        await self._put(line)

    async def finish(self) -> None:
        """Wait until every line said is written (or cannot be)."""
        await self._put(None)
        await self._written.wait()

    async def _put(self, item: str | None) -> None:
        while True:
            try:
                self._lines.put_nowait(item)
            except queue.Full:
                await asyncio.sleep(0.02)
            else:
                return

    def _write(self) -> None:
        try:
            self._write_lines()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                self._loop.call_soon_threadsafe(self._written.set)

    def _write_lines(self) -> None:
        # The file descriptor, not sys.stdout: a daemon thread holding sys.stdout's lock
        # in a write that never ends makes the interpreter's exit abort ("could not
        # acquire lock ... at interpreter shutdown").
        out = self._out
        try:
            fd: int | None = out.fileno() if out is not None else None
        except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
            fd = None
        # One encoder for the whole report: a byte order mark (UTF-16) once, not a line.
        encode = codecs.getincrementalencoder(self._encoding)("backslashreplace").encode
        while (line := self._lines.get()) is not None:
            if self._gone:
                continue
            try:
                if fd is None:
                    assert out is not None  # noqa: S101  # else gone from the start
                    out.write(line + "\n")
                    continue
                view = memoryview(encode(line + "\n"))
                while view:
                    view = view[os.write(fd, view) :]
            except BrokenPipeError:  # the reader went away: said nowhere, as asked
                self._gone = True
            except Exception as exc:  # the exit says it
                self.failure = exc
                self._gone = True


#: How many lines of a replay's report may wait for a slow reader.
REPORT_LINES = 1000


async def _replay_dead_letters(
    settings: Settings, query: DeadLetterQuery, tally: _ReplayTally, *, dry_run: bool
) -> None:
    """Replay each dead letter ``query`` wants as it is read, printing what became of
    it, and counting it in ``tally``."""
    from bridge import kafkaadmin  # noqa: PLC0415

    def publishing(record: Any) -> None:
        tally.publishing = kafkaadmin.position(record)

    # SIGTERM (kill, a container stopped) stops it as Ctrl-C does, summary included:
    # it ended the process at once, the summary and the record in flight unsaid. Once:
    # a second would cut short the producer's flush and close below.
    task = asyncio.current_task()
    assert task is not None  # noqa: S101  # run by asyncio.run

    stopped = False

    def stop() -> None:
        # Not task.cancelling(): a publish timeout expiring in the same turn counts
        # there too, and the SIGTERM was dropped.
        nonlocal stopped
        if not stopped:
            stopped = True
            task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
    report = _Report()
    letters = kafkaadmin.dead_letters(settings, query)
    results = kafkaadmin.replay_dead_letters(
        settings, _router(settings), letters, dry_run=dry_run, publishing=publishing
    )
    try:
        # Closed in this order (the producer flushes, then the consumer stops) however
        # it ends.
        async with contextlib.aclosing(letters), contextlib.aclosing(results):
            async for record, result, outcome, topic in results:
                # Counted before its line: a stop while the line waits for its reader
                # left a record published, and maybe its line unwritten, out of the summary.
                tally.publishing = ""
                tally.saw(record.partition, record.offset, kafkaadmin.key_forms(record.key))
                tally.count(result)
                target = f" -> {topic}" if topic else ""
                position = kafkaadmin.position(record)
                await report.say(
                    kafkaadmin.shown(
                        [f"{position:<9} key={kafkaadmin.text(record.key)}  {outcome}{target}"]
                    )
                )
    except BaseException:
        # Stopped (SIGTERM, Ctrl-C, Kafka away): the lines said so far go out before
        # the summary if their reader takes them within a second; it may never (a
        # stalled pipe, the reason for a SIGTERM).
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(1):
                await report.finish()
        tally.report_failure = report.failure
        raise
    await report.finish()  # the summary follows the report
    tally.report_failure = report.failure


def _tail(settings: Settings, args: argparse.Namespace) -> int:
    from bridge import kafkaadmin  # noqa: PLC0415

    pattern = args.pattern
    if not args.topics and pattern is None:
        pattern = template_pattern(settings.topic_template)
        print(f"tailing topics matching {pattern} (Ctrl-C to stop)", file=sys.stderr)
    asyncio.run(
        kafkaadmin.tail(
            settings,
            args.topics,
            pattern=pattern,
            from_beginning=args.from_beginning,
            limit=args.limit,
            as_json=args.json,
        )
    )
    return 0
