"""The real ``bridge serve`` in unusual but real runtime environments: a locale that
is not UTF-8, a stderr whose reader went away or stalls, an inherited
prometheus-client setting (two reviews' tests)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from bridge import logs
from bridge.config import load_settings
from bridge.devkafka import dies_with_parent, free_port
from bridge.errors import ConfigError
from tests.fakes import TOKEN
from tests.polling import wait_until
from tests.process import BridgeProcess, wait_until_ready

#: What Python 3.11 runs with under LC_ALL=C when neither PEP 538 nor PEP 540 applies
#: (PYTHONCOERCECLOCALE=0 PYTHONUTF8=0), and under a latin-1 locale (a host whose
#: /etc/locale.conf says LANG=sv_SE.ISO-8859-1, which systemd gives its services).
NOT_UTF8 = {"LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    kept = root.handlers[:], root.level
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for handler in root.handlers:
            if handler not in kept[0]:
                handler.close()  # a WrittenApart's thread ends
        root.handlers[:], level = kept
        root.setLevel(level)


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_json_lines_are_json_on_a_stderr_that_is_not_utf8(
    monkeypatch: pytest.MonkeyPatch, root_logging: None, encoding: str
) -> None:
    """Under a locale that is not UTF-8 Python's stderr encodes with backslashreplace:
    a refusal's path "Räk" came out as R\\xe4k (ASCII; no JSON escape, the line is no
    JSON) or as the latin-1 byte 0xE4 (no UTF-8): a log pipeline that reads JSON lines
    drops or garbles every line naming a non-ASCII path, key or spool folder."""
    raw = io.BytesIO()
    stderr = io.TextIOWrapper(
        raw, encoding=encoding, errors="backslashreplace", line_buffering=True
    )
    monkeypatch.setattr(sys, "stderr", stderr)
    logs.configure("info", "json")
    logging.getLogger("bridge.ingress").info(
        "delivery refused: %s", "not_found", extra={"fields": {"path": "/webhooks/geins/Räk 🎉"}}
    )
    sys.stderr.flush()
    stderr.flush()
    (line,) = raw.getvalue().splitlines()
    assert json.loads(line.decode("utf-8"))["path"] == "/webhooks/geins/Räk 🎉"


@pytest.mark.kafka
@pytest.mark.slow
def test_the_serving_bridge_logs_json_lines_in_the_c_locale(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """The real process under LC_ALL=C (without the UTF-8 mode): every line of its log
    must be JSON, the refusal of a path with a non-ASCII letter too."""
    env = {
        **NOT_UTF8,
        "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_TOPIC_TEMPLATE": topic_prefix + ".{entity}.{action}",
    }
    with BridgeProcess(env, tmp_path / "bridge.log") as bridge:
        answer = httpx2.post(
            bridge.url + "/webhooks/geins/R%C3%A4k?action=update",
            headers={"Authorization": f"Bearer {TOKEN}"},
            content=b"{}",
            timeout=10,
        )
        assert answer.status_code == 422
        bridge.signal(signal.SIGTERM)
        assert bridge.wait(60) == 0
    lines = (tmp_path / "bridge.log").read_bytes().splitlines()
    refusals = [json.loads(line.decode("utf-8")) for line in lines if b"refused" in line]
    assert [r["path"] for r in refusals] == ["/webhooks/geins/Räk"]


@pytest.mark.kafka
@pytest.mark.slow
def test_a_stderr_reader_gone_does_not_make_a_clean_stop_a_failure(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """`bridge serve 2>&1 | shipper` and the shipper died (or a container runtime's log
    pipe closed): the bridge serves on, its log lines lost (EPIPE, SIGPIPE ignored),
    and a SIGTERM stops it cleanly, but Python's flush of the stderr buffer at exit
    fails and the process exits 120: a clean stop reported as a failure (Kubernetes'
    "Error", systemd's "failed")."""
    port = free_port()
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith("BRIDGE_") and k != "PYTHONUNBUFFERED"
        },  # buffered, as under systemd (deploy/systemd sets no PYTHONUNBUFFERED)
        "BRIDGE_HOST": "127.0.0.1",
        "BRIDGE_PORT": str(port),
        "BRIDGE_SPOOL_DIR": str(tmp_path / "spool"),
        "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_TOPIC_TEMPLATE": topic_prefix + ".{entity}.{action}",
    }
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=dies_with_parent(),  # noqa: PLW1509 - see dies_with_parent
    )
    try:
        wait_until_ready(proc, url + "/readyz", "bridge", 30, lambda: "(stderr is a pipe)")
        assert proc.stderr is not None
        proc.stderr.close()  # the reader goes away
        # a line to log (a refusal), which now meets EPIPE
        refused = httpx2.post(url + "/webhooks/geins", content=b"{}", timeout=10)
        assert refused.status_code == 401
        accepted = httpx2.post(
            url + "/webhooks/geins",
            headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": "pipe-1"},
            json={"entity": "Order", "action": "update", "id": "1"},
            timeout=10,
        )
        assert accepted.status_code == 202  # it serves on
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.kafka
@pytest.mark.slow
def test_an_inherited_prometheus_multiproc_dir_does_not_stop_the_bridge(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """PROMETHEUS_MULTIPROC_DIR in the environment (a platform's or base image's, for
    gunicorn apps) turns prometheus-client's multiprocess mode on at import: the bridge,
    one process serving its own registry, then writes counter_<pid>.db files there
    (a new set each start), and with the folder missing it exits 1 saying "cannot talk
    to Kafka at ...: [Errno 2] No such file or directory: '.../counter_<pid>.db'"."""
    missing = tmp_path / "prometheus"
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(missing),
        "BRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_TOPIC_TEMPLATE": topic_prefix + ".{entity}.{action}",
    }
    with BridgeProcess(env, tmp_path / "bridge.log") as bridge:  # RuntimeError: exited with 1
        assert httpx2.get(bridge.url + "/metrics", timeout=10).status_code == 200
    assert not missing.exists()


@pytest.mark.parametrize(
    "environ",
    [
        {"BRIDGE_TOKENS": "j\udce4tte-token-1234567890abcdef"},
        {"BRIDGE_TOKENS": TOKEN * 3, "BRIDGE_KAFKA_SASL_PASSWORD": "p\udce4ssword"},
    ],
)
def test_a_secret_not_utf8_in_the_environment_is_a_config_error(environ: dict[str, str]) -> None:
    """A byte that is not UTF-8 in a variable (an env file saved as latin-1; any
    non-ASCII letter under LC_ALL=C without the UTF-8 mode) reaches the settings as a
    surrogate escape, as os.environ gives it: the refusal's redaction of the secrets
    (orjson) raised TypeError, a traceback and exit 1 instead of the settings' exit 2,
    which systemd's RestartPreventExitStatus=2 does not stop: a restart loop."""
    with pytest.raises(ConfigError):
        load_settings(environ=environ)


def check_config_without_traceback(env: dict[str, str]) -> int:
    """`bridge check-config`'s exit code under ``env``, once sure it printed no
    traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "check-config"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert b"Traceback" not in done.stderr, done.stderr.decode("utf-8", "replace")
    return done.returncode


def test_check_config_under_the_c_locale_has_no_traceback(tmp_path: Path) -> None:
    """The real command under LC_ALL=C without the UTF-8 mode, a token with a non-ASCII
    letter (one the same host's UTF-8 locale takes): a settings error at worst
    (exit 2, one line), never a traceback."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
        **NOT_UTF8,
        "BRIDGE_TOKENS": "jätte-token-1234567890abcdef",
        "BRIDGE_SPOOL_DIR": str(tmp_path / "spool"),
    }
    assert check_config_without_traceback(env) in (0, 2)


class FakeStderr:
    """A stderr for WrittenApart: keeps what is written. Its reader can stall (from
    the first write, until ``reading`` is set; ``stalled`` says it began), and its
    disk be full for the first ``failures`` writes (a file under `2> file`)."""

    def __init__(self, *, stalls: bool = False, failures: int = 0) -> None:
        self.reading = threading.Event()
        if not stalls:
            self.reading.set()
        self.stalled = threading.Event()
        self.failures = failures
        self.written: list[str] = []

    def write(self, text: str) -> None:
        self.stalled.set()
        self.reading.wait()
        if self.failures:
            self.failures -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written.append(text)

    def flush(self) -> None:
        pass


def test_lines_past_what_a_stalled_reader_holds_are_dropped_and_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The serving bridge's log is written apart (logs.WrittenApart): a logging call
    never waits for stderr's reader. What piles up past WRITE_QUEUE_LINES is dropped,
    the oldest waiting first (the latest lines, an ERROR after a flood say, are kept),
    and said with its count once the reader keeps up again."""
    monkeypatch.setattr(logs, "WRITE_QUEUE_LINES", 5)
    stream = FakeStderr(stalls=True)
    handler = logs.WrittenApart(stream)
    handler.setFormatter(logs.TextFormatter())
    try:
        for n in range(20):  # returns at once, the reader stalled
            handler.handle(logging.makeLogRecord({"msg": f"line {n}", "levelno": 20}))
        stream.reading.set()
        handler.flush()
        # dropped lines are said once the queue is empty: one more line to find it so
        handler.handle(logging.makeLogRecord({"msg": "after", "levelno": 20}))
        handler.flush()
    finally:
        handler.close()
    text = "".join(stream.written)
    assert "line 19" in text  # the latest: kept
    said = re.findall(r"(\d+) log lines were dropped: stderr's reader did not keep up", text)
    written = re.findall(r"line (\d+)", text)
    assert written == sorted(written, key=int)
    assert [int(n) + len(written) for n in said] == [20], text
    assert "after" in text


@contextlib.contextmanager
def stalled_writer() -> Iterator[tuple[logs.WrittenApart, FakeStderr]]:
    """A writing-apart handler whose thread is stuck writing its first line (stderr's
    reader stalled) until the block ends; then the lines held are written."""
    stream = FakeStderr(stalls=True)
    handler = logs.WrittenApart(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        handler.handle(logging.makeLogRecord({"msg": "taken by the writer", "levelno": 20}))
        assert stream.stalled.wait(5)
        yield handler, stream
        stream.reading.set()
        assert handler.flush()
    finally:
        stream.reading.set()
        handler.close()


def test_one_line_over_the_byte_bound_does_not_drop_every_line_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """emit() drops the oldest waiting lines until the new one fits under
    WRITE_QUEUE_BYTES; a line longer than the bound on its own never fits, and the loop
    emptied the whole queue (up to 10,000 lines, the ERRORs of a flood among them)
    before it found out, and then dropped that line too (a review)."""
    monkeypatch.setattr(logs, "WRITE_QUEUE_BYTES", 1_000)
    with stalled_writer() as (handler, stream):
        for n in range(5):
            handler.handle(logging.makeLogRecord({"msg": f"kept {n}", "levelno": 40}))
        handler.handle(logging.makeLogRecord({"msg": "x" * 2_000, "levelno": 20}))
    text = "".join(stream.written)
    said = re.findall(r"(\d+) log lines were dropped", text)
    assert re.findall(r"kept (\d)", text) == ["0", "1", "2", "3", "4"], text
    assert said == ["1"], text


def test_last_words_are_not_dropped_to_make_room(monkeypatch: pytest.MonkeyPatch) -> None:
    """put_line (put_last: why a command failed) waits for room "as long as it takes"
    so that its line is never lost; emit() makes room by dropping the oldest line
    waiting, and the last words, once they were the oldest, were dropped like any
    other (a review's stress run lost some 45 % of them)."""
    monkeypatch.setattr(logs, "WRITE_QUEUE_LINES", 3)
    with stalled_writer() as (handler, stream):
        handler.put_line("bridge: the last words")
        for n in range(3):  # another thread's lines meanwhile (the queue holds 3)
            handler.handle(logging.makeLogRecord({"msg": f"later {n}", "levelno": 20}))
    assert "bridge: the last words" in "".join(stream.written)


def test_last_words_keep_their_order_and_emit_never_waits_for_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """emit() made room by taking the oldest line out, and put last words back at the
    end with a blocking put: behind later last words (their order reversed), and, when
    another put_line took the freed place meanwhile, waiting for the stalled writer on
    the event loop, the handler's lock held (a review). The oldest plain line makes
    room now, the last words staying where they are."""
    monkeypatch.setattr(logs, "WRITE_QUEUE_LINES", 3)
    with stalled_writer() as (handler, stream):
        handler.put_line("last words 1")
        handler.handle(logging.makeLogRecord({"msg": "a plain line", "levelno": 20}))
        handler.put_line("last words 2")
        waiting = threading.Thread(target=handler.put_line, args=("last words 3",), daemon=True)
        waiting.start()  # waits for room
        emitting = threading.Thread(  # the event loop's logging call
            target=handler.handle,
            args=(logging.makeLogRecord({"msg": "a refusal", "levelno": 20}),),
            daemon=True,
        )
        emitting.start()
        emitting.join(3)
        blocked = emitting.is_alive()
        waiting.join(3)
    text = "".join(stream.written)
    assert not blocked, "emit() waited for the stalled writer (the event loop stopped)"
    assert "a plain line" not in text  # the oldest plain line made room
    said = [text.index(f"last words {n}") for n in (1, 2, 3)]
    assert said == sorted(said), text


#: More 401s than a pipe's 64 KiB hold of their log lines (some 250 bytes each).
REFUSALS = 1500


def serving_unread(
    tmp_path: Path,
    args: list[str],
    *,
    stderr: int = subprocess.PIPE,
    new_session: bool = False,
    **environ: str | None,
) -> tuple[subprocess.Popen[bytes], str]:
    """``python *args`` serving (memory mode, no Kafka needed) with its stderr a pipe
    nobody reads yet (or the fd ``stderr``; ``new_session``: a session of its own, a
    terminal given becoming its controlling one, as in a shell), and its URL once
    /healthz answers. ``environ`` adds variables (None: without it; PYTHONUNBUFFERED is
    left out unless given)."""
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BRIDGE_") and k != "PYTHONUNBUFFERED"
    }
    env.update({k: v for k, v in environ.items() if v is not None})
    env.update(
        BRIDGE_HOST="127.0.0.1",
        BRIDGE_PORT=str(port),
        BRIDGE_ACK="memory",
        BRIDGE_TOKENS="a-token-of-some-32-characters-xyz",
        BRIDGE_KAFKA_BOOTSTRAP="127.0.0.1:1",
        BRIDGE_SPOOL_DIR=str(tmp_path / "spool"),
        BRIDGE_RATE_LIMIT="0",
    )
    url = f"http://127.0.0.1:{port}"
    dies = dies_with_parent()

    def preexec() -> None:
        if new_session:
            os.setsid()
        if dies is not None:
            dies()

    proc = subprocess.Popen(
        [sys.executable, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,  # a pipe: read by nobody until the test says
        preexec_fn=preexec,  # noqa: PLW1509 - see dies_with_parent
    )

    def healthy() -> bool:
        try:
            return httpx2.get(url + "/healthz", timeout=1).status_code == 200
        except httpx2.TransportError:
            return False

    try:
        assert wait_until(healthy, bool, within=60, every=0.1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def refuse(url: str, keys: range) -> int | None:
    """POST a 401 (a log line naming its key) for each of ``keys``; the first one
    not answered within 5 s (the event loop stuck), or None."""
    with httpx2.Client(timeout=5) as client:
        for n in keys:
            try:
                client.post(
                    url + "/webhooks/geins/Order/create",
                    content=b'{"id":"1"}',
                    headers={"Authorization": "Bearer wrong", "x-Idempotency-Key": f"k{n}"},
                )
            except httpx2.TimeoutException:
                return n
    return None


def through_a_flood(url: str) -> tuple[int | None, int | None]:
    """REFUSALS 401s (a log line each), then /healthz: the first refusal not answered
    within 5 s (or None), and /healthz's status (None: not within 5 s)."""
    unanswered = refuse(url, range(REFUSALS))
    try:
        return unanswered, httpx2.get(url + "/healthz", timeout=5).status_code
    except httpx2.TimeoutException:
        return unanswered, None


@pytest.mark.slow
def test_a_stalled_log_reader_does_not_stop_the_event_loop(tmp_path: Path) -> None:
    """The log went to stderr with a plain StreamHandler, written on the event loop.
    When whoever reads stderr stops for a while (journald or a container runtime's log
    pipe under pressure, `bridge serve | less` paused), the pipe filled, write()
    blocked, and with it the event loop: every request, /healthz too, waited until the
    reader came back. An unauthenticated client filled the pipe by itself: each 401 is
    a log line (a review's test)."""
    proc, url = serving_unread(tmp_path, ["-m", "bridge", "serve"])
    assert proc.stderr is not None
    try:
        unanswered, alive = through_a_flood(url)
        assert (unanswered, alive) == (None, 200), (
            f"the bridge stopped answering after {unanswered} refusals, "
            f"/healthz {alive}: its event loop waits for stderr's reader"
        )
    finally:
        # the reader comes back: the bridge can go on and stop
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()


LOOP_DEBUG = """\
import asyncio, sys
from bridge import server
started = server.BridgeServer.startup
async def startup(self, sockets=None):
    await started(self, sockets)
    print("debug", asyncio.get_running_loop().get_debug(), file=sys.__stdout__, flush=True)
    self.should_exit = True
server.BridgeServer.startup = startup
from bridge.cli import main
main(["serve"])
"""


@pytest.mark.parametrize(("asked", "debug"), [({}, False), ({"PYTHONASYNCIODEBUG": "1"}, True)])
def test_asyncios_debug_mode_is_had_when_asked(
    tmp_path: Path, asked: dict[str, str], debug: bool
) -> None:
    """uvicorn makes its event loop with asyncio's debug mode off, whatever
    PYTHONASYNCIODEBUG or -X dev say: slow callbacks and never-retrieved exceptions with
    where they came from could not be had for the bridge (a review)."""
    (tmp_path / "serve_once.py").write_text(LOOP_DEBUG)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "PYTHONASYNC"))},
        **asked,
        "BRIDGE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # nobody: not needed here
        "BRIDGE_KAFKA_CONNECT_TIMEOUT": "1",
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_ACK": "memory",
        "BRIDGE_PORT": str(free_port()),
        "BRIDGE_SPOOL_DIR": str(tmp_path / "spool"),
    }
    done = subprocess.run(
        [sys.executable, str(tmp_path / "serve_once.py")],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert f"debug {debug}" in done.stdout.decode(), done.stderr.decode()[-2000:]


# --- a review of the above: a latin-1 locale, the log's last lines ---

TOKEN_UTF8 = "jätte-token-1234567890abcdef"


@pytest.fixture(scope="module")
def latin1_locale(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A host whose locale is sv_SE.ISO-8859-1 (the commit's own example), built here."""
    folder = tmp_path_factory.mktemp("locales")
    if shutil.which("localedef") is None:
        pytest.skip("no localedef")
    made = subprocess.run(
        ["localedef", "-i", "sv_SE", "-f", "ISO-8859-1", str(folder / "sv_SE.ISO-8859-1")],
        capture_output=True,
        check=False,
    )
    if not (folder / "sv_SE.ISO-8859-1").exists():
        pytest.skip(f"cannot build the locale: {made.stderr!r}")
    return {
        "LOCPATH": str(folder),
        "LANG": "sv_SE.ISO-8859-1",
        "LC_ALL": "sv_SE.ISO-8859-1",
    }


def as_bytes(env: dict[str, str], **more: bytes) -> dict[bytes, bytes]:
    """An environment as the bytes a process gets, ``more`` as given."""
    return {
        **{k.encode(): v.encode() for k, v in env.items()},
        **{k.encode(): v for k, v in more.items()},
    }


SHOW_TOKENS = """\
from bridge.config import load_settings
print(ascii(load_settings().tokens))
"""


def test_a_utf8_token_is_read_as_utf8_under_a_latin1_locale(
    latin1_locale: dict[str, str],
) -> None:
    """README: tokens given in variables are read as UTF-8 whatever the locale. Under a
    latin-1 locale os.environ decodes each byte as latin-1 (no surrogates), and
    _as_utf8's encode("utf-8", "surrogateescape") turns the two bytes of a UTF-8 'ä'
    into the four of 'Ã¤': the token the bridge compares is not the one configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(latin1_locale)
    done = subprocess.run(
        [sys.executable, "-c", SHOW_TOKENS],
        env=as_bytes(env, BRIDGE_TOKENS=TOKEN_UTF8.encode()),
        capture_output=True,
        check=True,
    )
    assert done.stdout.decode().strip() == ascii((TOKEN_UTF8,))


def test_a_latin1_token_is_refused_under_a_latin1_locale(latin1_locale: dict[str, str]) -> None:
    """README: a token that is not UTF-8 (an env file saved as latin-1) is refused by
    name. Under a latin-1 locale it is taken, as the 'ä' its byte 0xE4 is there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(latin1_locale)
    done = subprocess.run(
        [sys.executable, "-c", SHOW_TOKENS],
        env=as_bytes(env, BRIDGE_TOKENS=TOKEN_UTF8.encode("latin-1")),
        capture_output=True,
        check=False,
    )
    assert b"not UTF-8 text" in done.stderr, (done.stdout, done.stderr)


def test_the_last_line_stays_last_when_the_reader_stalls_at_the_stop(
    monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    """write_in_place (the end of serve) waited FLUSH_WAIT_SECONDS for the writer
    thread, then wrote in place: the lines logged after it (the last words,
    "stopped") went out before those the thread still held, or those were lost at the
    exit. It waits for them as long as the reader takes, as writing in place did."""
    monkeypatch.setattr(logs, "FLUSH_WAIT_SECONDS", 0.2)  # the wait's length only
    stream = FakeStderr(stalls=True)
    handler = logs.WrittenApart(stream)
    handler.setFormatter(logs.TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    log = logging.getLogger("bridge.review")
    log.info("first")
    assert stream.stalled.wait(10)
    for n in range(300):  # held by the thread while its reader stalls
        log.info("before the stop %d", n)
    ending = threading.Thread(target=logs.write_in_place)  # the end of serve
    ending.start()
    ending.join(0.5)  # past FLUSH_WAIT_SECONDS: it still waits
    assert ending.is_alive(), "the end of serve did not wait for the lines held"
    stream.reading.set()  # the reader is back
    ending.join(10)
    log.error("the bridge stopped: the last line")
    text = "".join(stream.written)
    assert text.index("before the stop 299") < text.index("the last line"), text[-300:]


def test_a_line_logged_by_another_thread_as_serve_ends_is_not_lost(
    root_logging: None,
) -> None:
    """Between the writer thread taking close()'s end-of-lines and write_in_place
    putting the plain handler in its place, a line another thread logs (the spool's
    writer thread, a Kafka client's callback) goes into the queue nobody reads."""
    other_logged = threading.Event()

    def other_thread() -> None:
        logging.getLogger("bridge.spool").warning("from another thread")
        other_logged.set()

    class _Stream:
        written: list[str] = []  # noqa: RUF012

        def write(self, text: str) -> None:
            if text == "":  # the writer's last batch: close()'s None alone
                # the other thread logs now (the handler is still the root's)
                threading.Thread(target=other_thread).start()
                other_logged.wait(10)
            self.written.append(text)

        def flush(self) -> None:
            pass

    stream = _Stream()
    handler = logs.WrittenApart(stream)
    handler.setFormatter(logs.TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("bridge").info("serving")
    handler.flush()
    logs.write_in_place()
    logging.getLogger("bridge").info("after")
    assert "from another thread" in "".join(stream.written)


def test_check_config_json_with_a_path_not_utf8_has_no_traceback(tmp_path: Path) -> None:
    """logs.configure reconfigures stderr to encoding="utf-8" for JSON, which resets its
    errors from backslashreplace to strict: a line printed on stderr bare (check-config's
    warnings, a traceback) with a path that is not UTF-8 (a surrogate, as os.environ and
    the file system give it) raises UnicodeEncodeError. Before, \\udce4 was written."""
    folder = os.fsencode(tmp_path) + b"/sp\xe4ol"
    os.mkdir(folder)
    (Path(os.fsdecode(folder)) / "spool.db").write_bytes(b"")  # a durable bridge's leftover
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        BRIDGE_TOKENS="a-token-of-some-32-characters-xyz",
        BRIDGE_ACK="broker",
        BRIDGE_LOG_FORMAT="json",
        BRIDGE_SPOOL_DIR=os.fsdecode(folder),
    )
    assert check_config_without_traceback(env) == 0


# --- a review of the log writer at the stop ---


def test_a_flush_under_the_handlers_lock_writes_the_lines_held(
    monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    """logging.shutdown (atexit) flushes every live handler holding its lock
    (h.acquire(); h.flush(); h.close()): the WrittenApart still in place at the exit
    (a reader that stalled past write_in_place's flush) is flushed so. The writer
    thread takes that same lock for the dropped count before it writes each batch:
    it waits for the lock, the flush for the writer, until FLUSH_WAIT_SECONDS ends,
    twice (flush, close), and the lines it holds die with the process."""
    monkeypatch.setattr(logs, "FLUSH_WAIT_SECONDS", 1.0)  # the wait's length only
    stream = FakeStderr()
    handler = logs.WrittenApart(stream)
    handler.setFormatter(logs.TextFormatter())
    record = logging.makeLogRecord({"name": "bridge", "msg": "held at the exit"})
    handler.acquire()  # as logging.shutdown does
    try:
        handler.handle(record)
        written = handler.flush()
    finally:
        handler.release()
    assert written, "flush() under the handler's lock: the writer waits for the lock"
    assert "held at the exit" in "".join(stream.written)


SERVE_WITH_A_SHORT_FLUSH = """\
import sys
from bridge import logs
logs.FLUSH_WAIT_SECONDS = 0.5  # the wait's length only: 5 s in production
sys.argv = ["bridge", "serve"]
from bridge.__main__ import main
sys.exit(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("unbuffered", [False, True], ids=["systemd", "container"])
def test_a_reader_stalled_at_the_stop_loses_no_line(tmp_path: Path, unbuffered: bool) -> None:
    """journald (or a container runtime's log pipe) under pressure as the bridge stops:
    its reader stalls past write_in_place's flush, then reads again. Every line must
    come out, the stop's last ("Finished server process") last, as when the lines were
    written in place. They were lost: with a buffered stderr (systemd) the exit's
    logging.shutdown flushed the handler under its lock, which the writer needed (see
    the test above), and the process ended with the queue; with PYTHONUNBUFFERED
    (deploy/Dockerfile) the process did not even wait for the reader (a review)."""
    proc, url = serving_unread(
        tmp_path, ["-c", SERVE_WITH_A_SHORT_FLUSH], PYTHONUNBUFFERED="1" if unbuffered else None
    )
    assert proc.stderr is not None
    try:
        with httpx2.Client(timeout=10) as client:
            for _ in range(REFUSALS):
                client.post(
                    url + "/webhooks/geins/Order/create",
                    content=b'{"id":"1"}',
                    headers={"Authorization": "Bearer wrong"},
                )
        proc.send_signal(signal.SIGTERM)
        # the reader stalls well past the flush's wait (0.5 s), then comes back
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        text = proc.stderr.read().decode()
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    lines = text.splitlines()
    assert code == 0
    assert "Fatal Python error" not in text
    assert sum('"delivery refused' in line for line in lines) == REFUSALS, len(lines)
    assert "Finished server process" in lines[-1], lines[-1][:200]


# --- a third review of the log writer: its counts, and a close racing a line ---


def test_the_lines_a_full_disk_lost_are_all_counted() -> None:
    """Three lines meet a full disk, one batch each (flushed in between): the WARNING
    once there is room must say 3 lines were dropped. The writer takes the count into
    the warning line of the next batch, and when that batch fails too adds only the
    batch's length (its lines plus the warning line itself), losing the count carried:
    it says 2."""
    stream = FakeStderr(failures=3)
    handler = logs.WrittenApart(stream)
    handler.setFormatter(logs.TextFormatter())
    try:
        for n in range(3):
            handler.handle(logging.makeLogRecord({"msg": f"lost {n}", "levelno": 20}))
            assert handler.flush()
        handler.handle(logging.makeLogRecord({"msg": "written", "levelno": 20}))
        assert handler.flush()
    finally:
        handler.close()
    text = "".join(stream.written)
    assert "written" in text
    said = re.findall(r"(\d+) log lines were dropped", text)
    assert said == ["3"], text


def test_a_line_emitted_as_write_in_place_closes_the_handler_is_not_lost() -> None:
    """Another thread's logging call went through the root's handlers list before
    write_in_place put the plain handler in its place, and is still in the writing-apart
    handler's filters (descheduled in the Redacting filter, say) while write_in_place
    flushes it and close() puts the writer's end in its queue. Its emit then puts the
    line in a queue nobody reads any more: lost, and emit returns as if written."""
    in_filter, go_on = threading.Event(), threading.Event()

    def descheduled(record: logging.LogRecord) -> bool:
        if record.getMessage() == "from another thread":
            in_filter.set()
            go_on.wait(10)
        return True

    written: list[str] = []

    class _Stream:
        def write(self, text: str) -> None:
            written.append(text)

        def flush(self) -> None:
            pass

    root = logging.getLogger()
    kept = root.handlers[:], root.level
    handler = logs.WrittenApart(_Stream())
    handler.setFormatter(logs.TextFormatter())
    handler.addFilter(descheduled)
    try:
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        other = threading.Thread(
            target=logging.getLogger("bridge.spool").warning, args=("from another thread",)
        )
        other.start()
        assert in_filter.wait(10)
        logs.write_in_place()  # the end of serve
        go_on.set()
        other.join(10)
    finally:
        go_on.set()
        root.handlers[:], level = kept
        root.setLevel(level)
    assert "from another thread" in "".join(written)


def test_last_words_do_not_loosen_the_byte_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """put_line's line is not added to the queued bytes, but the writer takes it off
    them when written: the count goes negative by its length, and as many more bytes
    than WRITE_QUEUE_BYTES wait from then on (for ever: nothing adds it back)."""
    monkeypatch.setattr(logs, "WRITE_QUEUE_BYTES", 1_000)
    reading = threading.Event()
    reading.set()
    written: list[str] = []

    class _Stalls:
        def write(self, text: str) -> None:
            reading.wait(10)
            written.append(text)

        def flush(self) -> None:
            pass

    handler = logs.WrittenApart(_Stalls())
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        handler.put_line("x" * 50_000)  # last words, long (a config error's list)
        assert handler.flush()
        reading.clear()  # the reader stalls
        handler.handle(logging.makeLogRecord({"msg": "taken by the writer", "levelno": 20}))
        for n in range(100):  # 100 lines of ~100 bytes: some 10 KB, past the 1,000
            handler.handle(logging.makeLogRecord({"msg": f"{n:03d} " + "y" * 96}))
        held = handler._lines.qsize()
    finally:
        reading.set()
        handler.close()
    assert held * 101 <= 1_000 + 101, f"{held} lines of 101 bytes held under a 1,000 bound"


class _Broken:
    """A stream whose write raises what the writer does not catch: its thread dies."""

    def write(self, text: str) -> None:
        raise RuntimeError("a bug in the stream")

    def flush(self) -> None:
        pass


def test_last_words_do_not_wait_for_ever_on_a_writer_that_died(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """put_line waited for room in the queue as long as it took: with the writer thread
    dead (a bug) and the queue full, serve's last words never returned."""
    monkeypatch.setattr(logs, "WRITE_QUEUE_LINES", 1)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # its death: expected
    handler = logs.WrittenApart(_Broken())
    handler.setFormatter(logs.TextFormatter())
    handler.handle(logging.makeLogRecord({"msg": "kills the writer", "levelno": 20}))
    handler._writer.join(10)
    assert not handler.writing
    handler.handle(logging.makeLogRecord({"msg": "fills the queue", "levelno": 20}))
    last = threading.Thread(target=handler.put_line, args=("the last words",), daemon=True)
    last.start()
    last.join(10)
    assert not last.is_alive(), "put_line waits for a writer that died"


def test_a_line_is_written_before_handle_returns_while_the_pipe_has_room() -> None:
    """Handed to the writer thread, a line was in the pipe only some time after the
    logging call returned: a process killed then (SIGKILL, the OOM killer; a test's
    kill) lost its last lines, the ERROR a test looked for among them. While the pipe
    takes a line at once it is written in place, as before."""
    read_end, write_end = os.pipe()
    stream = open(write_end, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    handler = logs.WrittenApart(stream)
    handler.setFormatter(logs.TextFormatter())
    try:
        os.set_blocking(read_end, False)
        handler.handle(logging.makeLogRecord({"msg": "the last words", "levelno": 40}))
        assert b"the last words" in os.read(read_end, 65536)  # no wait: there already
    finally:
        handler.close()
        stream.close()
        os.close(read_end)


# --- a review of the log writer on the kinds of stderr deployments give: a terminal
# (`docker run -t`, ``tty: true``), a pipe its parent made non-blocking, journald's
# stream socket, and a process killed right after an ERROR with its traceback ---


def read_log(data: bytes) -> tuple[list[int], int, list[bytes]]:
    """The keys of the refusals logged, in order, the lines said dropped, and the
    lines that are no JSON (half lines, two run together)."""
    keys, dropped, broken = [], 0, []
    for line in data.replace(b"\r\n", b"\n").splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            broken.append(line)
            continue
        if str(parsed.get("key", "")).startswith("k"):
            keys.append(int(parsed["key"][1:]))
        dropped += parsed.get("dropped", 0)
    return keys, dropped, broken


def stopped(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_terminal_that_stops_reading_does_not_stop_the_event_loop(tmp_path: Path) -> None:
    """stderr a terminal (a pty in its usual cooked mode: `docker run -t`, ``tty:
    true``, a terminal multiplexer) whose reader falls behind: select() says a tty is
    writable while it has any room at all, so a line longer than that room was
    written in place and the event loop blocked in write() with it, /healthz too,
    after some 60 refusals. (A SIGTERM then cut that line in half.)"""
    master, slave = pty.openpty()
    proc, url = serving_unread(
        tmp_path, ["-m", "bridge", "serve"], stderr=slave, new_session=True, PYTHONUNBUFFERED="1"
    )
    os.close(slave)
    reading = threading.Event()  # stalled until set

    def read() -> None:
        reading.wait()
        with contextlib.suppress(OSError):
            while os.read(master, 65536):
                pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        unanswered, alive = through_a_flood(url)
        assert (unanswered, alive) == (None, 200), (
            f"refusal {unanswered} not answered, /healthz {alive}: "
            "the event loop waits for the terminal's reader"
        )
    finally:
        reading.set()
        stopped(proc)
        os.close(master)


@pytest.mark.slow
def test_a_nonblocking_stderr_pipe_gets_whole_lines_and_a_true_count(tmp_path: Path) -> None:
    """A supervisor that set O_NONBLOCK on the pipe it gives as stderr (the file
    description is shared): once its reader falls behind, write() says EAGAIN or
    writes part of what it was given. The writer thread took either for "nothing
    written". Unbuffered (PYTHONUNBUFFERED, the image's), Python's FileIO returns
    None or the short count, which TextIOWrapper ignores: lines vanish with no count
    and no WARNING, and a half line runs into the next. Buffered (systemd), the
    BufferedWriter keeps what it took and writes it before the next line: half
    lines run into the next, and the WARNINGs count lines that were written."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # as the parent left it
    proc, url = serving_unread(
        tmp_path, ["-m", "bridge", "serve"], stderr=write_end, PYTHONUNBUFFERED="1"
    )
    os.close(write_end)
    chunks: list[bytes] = []
    slow = threading.Event()
    slow.set()

    def read() -> None:  # 40 KB/s while slow: behind the flood, never gone
        with contextlib.suppress(OSError):
            while True:
                if slow.is_set():
                    time.sleep(0.1)
                chunk = os.read(read_end, 4096)
                if not chunk:
                    return
                chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert refuse(url, range(REFUSALS)) is None
        slow.clear()  # the reader catches up
        time.sleep(1)
        assert refuse(url, range(REFUSALS, REFUSALS + 3)) is None  # says what was dropped
        time.sleep(0.5)
        assert stopped(proc) == 0
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_end)
    keys, dropped, broken = read_log(b"".join(chunks))
    assert broken == [], f"{len(broken)} broken lines, the first: {broken[0][:300]!r}"
    assert keys == sorted(keys)
    assert len(keys) + dropped == REFUSALS + 3, (len(keys), dropped)


KILLED_AFTER_AN_ERROR = """\
import json, logging, os, signal
from bridge import logs
logs.configure("info", "json", background=True)
def parse(n):
    return parse(n - 1) if n else json.loads("{a spool row that is no JSON")
try:
    parse(8)
except ValueError:
    logging.getLogger("bridge.spool").exception("the spool writer failed unexpectedly")
os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, a supervisor's kill
"""


@pytest.mark.parametrize("kind", ["file", "pipe"])
def test_an_error_with_its_traceback_is_out_before_a_sigkill(tmp_path: Path, kind: str) -> None:
    """An ERROR with a traceback, some 1.3 KB in all, then SIGKILL: a stderr that takes it at
    once (a file; a pipe that is empty) must have it. Any line over 1,024 characters
    went to the writer thread (logs.WrittenApart._room_for), which waits 2 ms before
    it writes: the kill lost the ERROR, which says why the process was in trouble."""
    if kind == "file":
        log = tmp_path / "stderr"
        stderr: int = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    else:
        read_end, stderr = os.pipe()
    done = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_AN_ERROR], stderr=stderr, check=False, timeout=60
    )
    os.close(stderr)
    if kind == "file":
        text = log.read_text()
    else:
        with os.fdopen(read_end, "rb") as pipe:
            text = pipe.read().decode()
    assert done.returncode == -signal.SIGKILL
    assert "the spool writer failed unexpectedly" in text, text
    [line] = text.splitlines()
    assert json.loads(line)["level"] == "error"
    assert len(line) > 1024  # longer than _room_for writes in place


SERVE_WITH_A_SMALL_QUEUE = """\
import sys
from bridge import logs
logs.WRITE_QUEUE_LINES = 200  # the bound's size only: 10,000 in production
sys.argv = ["bridge", "serve"]
from bridge.__main__ import main
sys.exit(main())
"""


@pytest.mark.slow
def test_the_stops_own_lines_are_not_dropped_behind_a_full_queue(tmp_path: Path) -> None:
    """stderr journald's stream socket (`StandardError=journal`: a Unix SOCK_STREAM),
    whose reader stalls long enough for the queue to fill (a flood of 401s), then
    comes back. The README promises that at a stop the bridge waits for the reader to
    take the lines still waiting, "the stop's own last"; but the stop's lines
    ("SIGTERM received", ..., "Finished server process") are logged while the queue is
    still full, and dropped like the flood's: the log ends in the middle of the
    flood, and nothing says the bridge stopped (or, in durable mode, what it left)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc, url = serving_unread(tmp_path, ["-c", SERVE_WITH_A_SMALL_QUEUE], stderr=theirs.fileno())
    theirs.close()
    try:
        assert refuse(url, range(REFUSALS)) is None  # the reader stalled: never read yet
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(3)  # the reader still stalled as the bridge stops
        chunks = []
        while chunk := ours.recv(65536):  # the reader comes back
            chunks.append(chunk)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ours.close()
    text = b"".join(chunks).decode()
    keys, dropped, broken = read_log(text.encode())
    assert code == 0
    assert (broken, len(keys) + dropped >= REFUSALS) == ([], True)
    assert dropped  # the flood overflowed the queue: said
    assert "SIGTERM received" in text
    assert "Finished server process" in text.splitlines()[-1], text.splitlines()[-1][:300]
