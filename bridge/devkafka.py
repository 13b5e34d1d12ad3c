"""A single-node Apache Kafka broker for development and tests.

The bridge needs a real Apache Kafka (aiokafka's idempotent producer does not
work against look-alike brokers), but this machine has no Docker and cannot
download the release tarball. Maven Central is reachable, and the broker is
just ``java -cp 'libs/*' kafka.Kafka server.properties`` once the jars of
``org.apache.kafka:kafka_2.13`` and their runtime dependencies sit in one
folder. This module fetches those jars with Maven and runs a combined
broker+controller (KRaft) from them.

It is stdlib-only on purpose: ``make`` and CI call it before any virtualenv
exists.

Command line::

    python -m bridge.devkafka fetch|up|down|status [--home .cache/kafka]
        [--port 9092] [--controller-port 9093]

From Python (a pytest fixture, say)::

    with LocalKafka(home, tmp / "data", free_port(), free_port()) as kafka:
        ...  # kafka.bootstrap == "127.0.0.1:<port>"
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import ctypes
import fcntl
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple, Self

from bridge.signals import stop_signals

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Mapping, Sequence
    from types import TracebackType

KAFKA_VERSION = "4.4.0"
"""The broker version. Newest 4.x on Maven Central when this was written."""

LOG4J_VERSION = "2.25.5"
"""The log4j2 version that ``kafka-server`` itself declares for KAFKA_VERSION."""

MIN_JAVA = 17
"""Kafka 4.x brokers refuse to run on older Java."""

POM_TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "pom.xml"
"""The jar list, kept as a real POM so it can be read and tried by hand."""

DEFAULT_HOME = Path(".cache/kafka")
"""Relative to the working directory: the Makefile calls us from the repo root."""

DEFAULT_PORT = 9092
DEFAULT_HEAP = "384m"

STARTED_MARKER = "Kafka Server started"
"""Logged by KafkaRaftServer once broker and controller are both up and the
broker is unfenced, i.e. clients can produce. An open port alone is not
enough: the socket is bound well before requests are served."""

_LOG_TAIL_LINES = 25
_LOG_CAUSE_LINES = 6
_REPLY_HEAD = 8  # int32 size + int32 correlation id of a Kafka response
_MARKER_FILE = ".complete"

# Log4j2 properties for the broker. Console only: the broker's stdout goes to
# the log file the caller chose, so one config serves every broker in the
# cache. INFO keeps the start/stop story readable; the per-request and
# per-segment chatter goes to WARN so a long-running dev broker's log stays
# small.
_LOG4J2_PROPERTIES = """\
# Written by bridge/devkafka.py; rewritten whenever it differs.
status = warn
name = devkafka

appender.console.type = Console
appender.console.name = STDOUT
appender.console.target = SYSTEM_OUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n

rootLogger.level = INFO
rootLogger.appenderRef.console.ref = STDOUT

logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.requestchannel.name = kafka.network.RequestChannel$
logger.requestchannel.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
logger.storage.name = org.apache.kafka.storage.internals.log
logger.storage.level = WARN
logger.logmanager.name = kafka.log.LogManager
logger.logmanager.level = WARN
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.groupcoord.name = org.apache.kafka.coordinator.group
logger.groupcoord.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
logger.perf.name = org.apache.kafka.controller.EventPerformanceMonitor
logger.perf.level = WARN
"""


class DevKafkaError(RuntimeError):
    """A failure the caller can act on: the message says what to do."""


# --------------------------------------------------------------------------
# Jars


def kafka_home(cache_dir: Path) -> Path:
    """Folder of one Kafka version inside the cache (so versions never mix)."""
    return cache_dir / f"kafka-{KAFKA_VERSION}"


def log4j_config(cache_dir: Path) -> Path:
    """Path of the broker's log4j2 config inside the cache."""
    return kafka_home(cache_dir) / "log4j2.properties"


def _fingerprint(pom: str) -> str:
    """Identify what a jar download was made from.

    Stored in the marker so that editing the POM or the versions refetches,
    instead of silently running stale jars.
    """
    digest = hashlib.sha256(pom.encode()).hexdigest()[:16]
    return f"kafka={KAFKA_VERSION} log4j={LOG4J_VERSION} pom={digest}\n"


def _write_if_changed(path: Path, text: str) -> None:
    """Write a file atomically, and only if its content changed.

    Atomic so that a broker or StorageTool never reads a half-written file;
    only on change so that parallel callers do not race on identical content.
    """
    with contextlib.suppress(FileNotFoundError):
        if path.read_text(encoding="utf-8") == text:
            return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


@contextlib.contextmanager
def _locked(lock_file: Path) -> Generator[None]:
    """Hold an exclusive lock, so parallel test processes fetch only once."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a tool (Maven, java, Kafka's StorageTool) to its end; its output captured."""
    return subprocess.run(  # noqa: S603 - argument list, no shell
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )


def _find_mvn() -> str:
    """Locate Maven or explain how to get it."""
    mvn = shutil.which("mvn")
    if mvn is None:
        msg = (
            "Maven ('mvn') is not on PATH; it is needed once to fetch the Kafka "
            "jars from Maven Central (Debian: apt-get install maven)"
        )
        raise DevKafkaError(msg)
    return mvn


def ensure_jars(cache_dir: Path) -> Path:
    """Make sure the Kafka broker jars are in the cache; return the libs dir.

    Idempotent and safe to call from parallel processes. The marker file is
    written only after Maven succeeded, so an interrupted download is redone
    from scratch rather than leaving a classpath with missing jars. Also
    (re)writes the log4j2 config, which is cheap and keeps it current.
    """
    home = kafka_home(cache_dir.resolve())
    libs = home / "libs"
    marker = home / _MARKER_FILE
    try:
        pom = POM_TEMPLATE.read_text(encoding="utf-8")
    except FileNotFoundError:
        msg = f"POM template missing: {POM_TEMPLATE} (is the repo checkout complete?)"
        raise DevKafkaError(msg) from None
    fingerprint = _fingerprint(pom)

    with _locked(home / ".lock"):
        _write_if_changed(log4j_config(cache_dir.resolve()), _LOG4J2_PROPERTIES)
        with contextlib.suppress(FileNotFoundError):
            if marker.read_text(encoding="utf-8") == fingerprint and _jars_whole(libs):
                return libs
        marker.unlink(missing_ok=True)
        if libs.exists():
            shutil.rmtree(libs)
        pom_file = home / "pom.xml"
        pom_file.write_text(pom, encoding="utf-8")
        mvn = _find_mvn()
        _copy_dependencies(mvn, pom_file, libs)
        damaged = _damaged_jars(libs)
        if damaged:
            # Maven copies from its local repository without checking it: a jar cut
            # there (a killed download, a full disk) came back on every fetch.
            repository = _local_repository(mvn)
            evicted = _evict(repository, [jar.name for jar in damaged])
            print(
                f"devkafka: damaged in Maven's local repository, removed to download "
                f"again: {', '.join(map(str, evicted)) or 'none found there'}",
                file=sys.stderr,
            )
            shutil.rmtree(libs)
            _copy_dependencies(mvn, pom_file, libs)
            damaged = _damaged_jars(libs)
            if damaged:
                names = ", ".join(jar.name for jar in damaged)
                msg = (
                    f"these Kafka jars are damaged even after a fresh download: {names}; "
                    f"delete them from Maven's local repository ({repository}) and retry"
                )
                raise DevKafkaError(msg)
        marker.write_text(fingerprint, encoding="utf-8")
    return libs


def _copy_dependencies(mvn: str, pom_file: Path, libs: Path) -> None:
    """Have Maven put the broker's runtime jars in ``libs``, or explain its failure."""
    cmd = [
        mvn,
        "-q",
        "-B",
        "--strict-checksums",  # a jar that does not match its .sha1 fails the fetch
        "-Dstyle.color=never",
        "-f",
        str(pom_file),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={libs}",
        "-DincludeScope=runtime",
        f"-Dkafka.version={KAFKA_VERSION}",
        f"-Dlog4j.version={LOG4J_VERSION}",
    ]
    result = _run(cmd)
    jars = list(libs.glob("kafka_2.13-*.jar")) if libs.is_dir() else []
    if result.returncode != 0 or not jars:
        output = (result.stdout + result.stderr).strip().splitlines()
        tail = "\n".join(output[-_LOG_TAIL_LINES:])
        msg = (
            f"fetching Kafka {KAFKA_VERSION} jars with Maven failed "
            f"(exit {result.returncode}); command: {' '.join(cmd)}\n{tail}"
        )
        raise DevKafkaError(msg)


def _local_repository(mvn: str) -> Path:
    """Maven's local repository: ~/.m2/repository unless settings.xml, MAVEN_OPTS or
    MAVEN_ARGS move it, so Maven itself is asked (only when a jar is damaged)."""
    result = _run(
        [
            *(mvn, "-q", "-B", "-Dstyle.color=never", "help:evaluate"),
            *("-Dexpression=settings.localRepository", "-DforceStdout"),
        ]
    )
    # Maven 3.8 colours -DforceStdout output even with -Dstyle.color=never.
    answer = Path(re.sub(r"\x1b\[[0-9;]*m", "", result.stdout).strip())
    if result.returncode == 0 and answer.is_absolute() and answer.is_dir():
        return answer
    return Path.home() / ".m2" / "repository"


def _evict(repository: Path, names: Sequence[str]) -> list[Path]:
    """Delete the files called ``names`` from a Maven repository folder, so that Maven
    downloads them again; return what was deleted."""
    evicted = []
    for name in names:
        for found in repository.rglob(name):
            if found.is_file():
                try:
                    found.unlink()
                except OSError as exc:
                    msg = (
                        f"the Kafka jar {found} in Maven's local repository is damaged and "
                        f"cannot be removed ({exc.strerror}): delete it, then retry"
                    )
                    raise DevKafkaError(msg) from None
                evicted.append(found)
    return evicted


# --------------------------------------------------------------------------
# Java


def find_java() -> str:
    """Locate a Java >= 17 (JAVA_HOME first, like Kafka's scripts) or explain."""
    java_home = os.environ.get("JAVA_HOME")
    java: str | None
    if java_home:
        java = str(Path(java_home) / "bin" / "java")
        if not Path(java).is_file():
            msg = (
                f"JAVA_HOME={java_home} has no bin/java: point it at a Java {MIN_JAVA}+ "
                "installation, or unset it to use the java on PATH"
            )
            raise DevKafkaError(msg)
    else:
        java = shutil.which("java")
    if java is None or not Path(java).is_file():
        msg = (
            f"Java {MIN_JAVA}+ is needed to run the Kafka broker and 'java' was not "
            "found (set JAVA_HOME or put java on PATH; Debian: "
            "apt-get install openjdk-17-jre-headless)"
        )
        raise DevKafkaError(msg)
    try:
        out = _run([java, "-version"])
    except OSError as exc:  # built for another CPU, not executable: a traceback before
        msg = (
            f"{java} cannot be run ({exc.strerror}): point JAVA_HOME or PATH at a Java "
            f"{MIN_JAVA}+ for this machine"
        )
        raise DevKafkaError(msg) from None
    found = re.search(r'version "(\d+)', out.stderr + out.stdout)
    if found is None or int(found.group(1)) < MIN_JAVA:
        first = (out.stderr + out.stdout).strip().splitlines()[:1]
        msg = f"Kafka {KAFKA_VERSION} needs Java {MIN_JAVA}+, {java} is: {first}"
        raise DevKafkaError(msg)
    return java


# --------------------------------------------------------------------------
# Ports and probing


def _damaged_jars(libs: Path) -> list[Path]:
    """The jars in ``libs`` that do not open as zip files (a cut download, a full disk):
    one made the broker fail to start with a NoClassDefFoundError."""
    damaged = []
    for jar in sorted(libs.glob("*.jar")) if libs.is_dir() else []:
        try:
            with zipfile.ZipFile(jar):  # reads the central directory, at the end
                pass
        except (OSError, zipfile.BadZipFile):
            damaged.append(jar)
    return damaged


def _jars_whole(libs: Path) -> bool:
    """Whether ``libs`` holds jars and all of them open: without this check a damaged
    cache was never fetched again."""
    if not (libs.is_dir() and any(libs.glob("*.jar"))):
        return False
    damaged = _damaged_jars(libs)
    if damaged:
        names = ", ".join(jar.name for jar in damaged)
        print(f"devkafka: damaged jars in {libs} ({names}): fetching them again", file=sys.stderr)
    return not damaged


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux; a common default else)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct ports free on 127.0.0.1 right now.

    Chosen at random below the kernel's ephemeral range: a port the kernel hands
    out itself (bind to port 0) can be taken a moment later by any outgoing
    connection, and a busy test suite makes thousands, so a broker or bridge
    started on it would then fail with "Address already in use". The sockets
    are held until all are chosen so the ports differ.
    """
    low = min(_ephemeral_range()[0], 32768)
    if low < 11000:  # an ephemeral range from 1024, say: no room below it; take one apart
        low = 20000
    rng = random.SystemRandom()
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            port = rng.randrange(10000, low)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()  # held open, a long search ran out of file descriptors
                continue
            stack.enter_context(sock)
            ports.append(port)
        return ports


def free_port() -> int:
    """Return a port free on 127.0.0.1 right now (see free_ports)."""
    return free_ports(1)[0]


def _port_bindable(port: int) -> bool:
    """Tell whether a listener could bind the port right now.

    Binds as the JVM does (SO_REUSEADDR), so a port with connections in
    TIME_WAIT from a previous run counts as free, as it does for Kafka.
    Checked before starting to turn the broker's "Address already in use"
    stack trace into a one-line error.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def probe(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    """Whether a Kafka broker serves requests on host:port.

    Sends an ApiVersions v0 request and checks the reply: its correlation id, no
    error, and Produce and Metadata among the APIs it serves. Stronger than a TCP
    connect: it proves the port belongs to Kafka and that the broker processes
    requests, not merely that its socket is bound; and a KRaft controller's port
    (which answers ApiVersions, but serves neither) is no broker for the bridge:
    `make run KAFKA_PORT=9093` next to a running one used it, and nothing could be
    published there.
    """
    correlation_id = 0x0DE7CAFE
    client_id = b"devkafka-probe"
    # Request header v1: api_key=18 (ApiVersions), api_version=0,
    # correlation_id, client_id (int16 length + bytes); empty v0 body.
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exactly(sock, _REPLY_HEAD)
            if head is None:
                return False
            size: int
            got: int
            size, got = struct.unpack(">ii", head)
            if got != correlation_id or not _REPLY_HEAD // 2 + 6 <= size <= _MAX_PROBE_REPLY:
                return False
            rest = _recv_exactly(sock, size - _REPLY_HEAD // 2)
    except OSError:
        return False
    return rest is not None and _serves_clients(rest)


#: ApiVersions' reply lists each API in 6 bytes: some 80 of them in Kafka 4.
_MAX_PROBE_REPLY = 64 * 1024
#: Produce and Metadata: what a broker serves and a KRaft controller does not.
_CLIENT_APIS = frozenset({0, 3})


def _serves_clients(reply: bytes) -> bool:
    """Whether an ApiVersions v0 reply (after its correlation id) says no error and
    lists the APIs a producer needs."""
    error: int
    count: int
    error, count = struct.unpack_from(">hi", reply)
    if error != 0 or not 0 <= count <= (len(reply) - 6) // 6:
        return False
    keys = {struct.unpack_from(">h", reply, 6 + 6 * i)[0] for i in range(count)}
    return keys >= _CLIENT_APIS


def _recv_exactly(sock: socket.socket, count: int) -> bytes | None:
    """Read exactly ``count`` bytes; None if the peer closes first."""
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _log_excerpt(path: Path, start: int = 0) -> str:
    """Summarise a broker log (from byte offset ``start``) for an error message.

    The first ERROR lines with the exception line below each come first: when
    the broker dies, the cause is logged early and the last lines are only
    the shutdown that followed. Then the tail, for everything else.
    """
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            data = fh.read()
    except FileNotFoundError:
        return f"(no log at {path})"
    lines = data.decode(errors="replace").rstrip().splitlines()
    if not lines:
        return "(log is empty)"
    causes: list[str] = []
    for i, line in enumerate(lines):
        if len(causes) >= _LOG_CAUSE_LINES:
            break
        if "] ERROR " in line or "] FATAL " in line or line.startswith("Error"):
            causes += [c for c in lines[i : i + 2] if c not in causes]
    tail = "\n".join(lines[-_LOG_TAIL_LINES:])
    if not causes:
        return tail
    return "errors:\n" + "\n".join(causes) + f"\nlast {_LOG_TAIL_LINES} lines:\n" + tail


# --------------------------------------------------------------------------
# Processes not started by us (the CLI's pid file)


def config_file_of(data_dir: Path) -> Path:
    """The server.properties a broker with this data dir runs from (next to it)."""
    return data_dir.with_name(f"{data_dir.name}.properties")


def _is_broker_pid(pid: int, config_file: Path) -> bool:
    """Whether pid is alive and is the Kafka broker JVM running from ``config_file``.

    Checked before signalling a pid from a pid file, which may be stale and
    reused by an unrelated process, another broker included (pids start over
    after a container restart): any ``kafka.Kafka`` JVM is not enough.
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return (
        state != "Z" and b"kafka.Kafka" in cmdline and os.fsencode(config_file.resolve()) in cmdline
    )


def _brokers_running_from(config_file: Path) -> list[int]:
    """Pids of the broker JVMs running from ``config_file`` (found in /proc)."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _is_broker_pid(int(entry.name), config_file)
    ]


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def dies_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child sent SIGTERM when its parent dies, even by
    SIGKILL (Linux ``prctl(PR_SET_PDEATHSIG)``); None where that is not available.

    The signal comes when the *thread* that started the child ends, so start the
    child from a thread that lives as long as it should (:func:`from_a_lifelong_thread`).
    If the parent died before the child could ask, the child exits instead of running on.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:  # runs in the child, between fork and exec: no allocation-heavy work
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


_lifelong: concurrent.futures.ThreadPoolExecutor | None = None
_lifelong_lock = threading.Lock()


def _no_lifelong_thread_yet() -> None:
    """In a forked child: the pool's thread was not forked with it, and a submit to the
    pool (which takes it for idle) waited forever."""
    global _lifelong, _lifelong_lock
    _lifelong, _lifelong_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_no_lifelong_thread_yet)


def from_a_lifelong_thread(
    start: Callable[[], subprocess.Popen[bytes]],
) -> subprocess.Popen[bytes]:
    """Run ``start`` on a thread that lasts as long as this process: a child started
    with :func:`dies_with_parent` from a worker thread (``asyncio.to_thread``, a thread
    pool) would be sent SIGTERM when that thread ended, long before the process that
    owns it."""
    global _lifelong  # noqa: PLW0603 - one thread per process, made on first use
    with _lifelong_lock:
        if _lifelong is None:
            # An idle pool thread never exits before the interpreter does.
            _lifelong = concurrent.futures.ThreadPoolExecutor(1, "devkafka-lifelong")
        pool = _lifelong
    return pool.submit(start).result()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the broker's process group (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def stop_pid(pid: int, config_file: Path, timeout: float = 20.0) -> bool:
    """Stop a detached broker by pid: SIGTERM, then SIGKILL after ``timeout``.

    Returns False if that pid is not a broker running from ``config_file``.
    SIGTERM lets Kafka shut down cleanly, which keeps the next start fast (no
    log recovery).
    """
    if not _is_broker_pid(pid, config_file):
        return False
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_broker_pid(pid, config_file):
            return True
        time.sleep(0.1)
    _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while _is_broker_pid(pid, config_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------
# The broker


_SECURITY_PROTOCOLS = frozenset({"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"})
_RESERVED_LISTENERS = frozenset({"PLAINTEXT", "CONTROLLER"})


class Listener(NamedTuple):
    """A client listener besides the PLAINTEXT one, e.g. ``Listener("SCRAM", 9094,
    "SASL_PLAINTEXT")``. Configure it with ``listener.name.<name in lower case>.*``
    properties (see LocalKafka's ``extra_properties``)."""

    name: str
    port: int
    protocol: str


class LocalKafka:
    """One KRaft broker+controller process on 127.0.0.1, owned by the caller.

    ``home`` is the jar cache (see ensure_jars); ``data_dir`` is log.dirs and
    may be reused across runs. The process runs in its own process group so
    that stop() also reaches anything it spawned and so that a Ctrl-C in the
    caller's terminal does not hit it first.

    The PLAINTEXT listener on ``port`` is always there (readiness is probed on
    it, and brokers talk to each other over it). Tests of client security add
    ``listeners`` (TLS, SASL), ``extra_properties`` (written after, and
    overriding, the defaults) and ``format_args`` (appended to ``kafka-storage
    format``, e.g. ``--add-scram SCRAM-SHA-512=[name=u,password=p]`` to create
    SCRAM users before the first start).

    With ``die_with_parent`` (Linux), the broker gets SIGTERM when the process that
    started it dies, even killed with SIGKILL, so a killed test run leaves no broker
    behind (see dies_with_parent). start() may be called from any thread: the broker
    is forked from one that lasts as long as the process. Off by default:
    ``devkafka up``'s broker must outlive the command. The test suite's brokers turn
    it on.
    """

    def __init__(
        self,
        home: Path,
        data_dir: Path,
        port: int,
        controller_port: int,
        *,
        heap: str = DEFAULT_HEAP,
        log_file: Path | None = None,
        listeners: Sequence[Listener] = (),
        extra_properties: Mapping[str, str] | None = None,
        format_args: Sequence[str] = (),
        die_with_parent: bool = False,
    ) -> None:
        """Describe a broker; nothing is started or fetched until format/start."""
        if port == controller_port:
            msg = f"port and controller_port must differ (both {port})"
            raise ValueError(msg)
        if not re.fullmatch(r"\d+[kKmMgG]?", heap):
            msg = f"heap must look like 384m or 1g, not {heap!r}"
            raise ValueError(msg)
        _check_listeners(listeners, (port, controller_port))
        self.listeners = tuple(listeners)
        self.extra_properties = dict(extra_properties or {})
        self.format_args = tuple(format_args)
        self.die_with_parent = die_with_parent
        self.home = home.resolve()
        self.data_dir = data_dir.resolve()
        self.port = port
        self.controller_port = controller_port
        self.heap = heap
        self.log_file = (
            log_file.resolve() if log_file else self.data_dir.with_name(f"{self.data_dir.name}.log")
        )
        self.config_file = config_file_of(self.data_dir)
        self._proc: subprocess.Popen[bytes] | None = None
        self._java_path: str | None = None
        self._log_start = 0

    @property
    def bootstrap(self) -> str:
        """The bootstrap servers string for clients."""
        return f"127.0.0.1:{self.port}"

    def listener_bootstrap(self, name: str) -> str:
        """The bootstrap servers string for clients of the extra listener ``name``."""
        for listener in self.listeners:
            if listener.name == name:
                return f"127.0.0.1:{listener.port}"
        msg = f"no listener named {name!r}"
        raise KeyError(msg)

    @property
    def pid(self) -> int | None:
        """The broker's pid while it runs (also its process group id)."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        """Whether the process started by start() is still alive."""
        return self._proc is not None and self._proc.poll() is None

    def server_properties(self) -> str:
        """Render server.properties: single node, loopback only, small for 2 cores."""
        extra = "".join(f",{x.name}://127.0.0.1:{x.port}" for x in self.listeners)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
                + extra
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}{extra}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
            + "".join(f",{x.name}:{x.protocol}" for x in self.listeners),
            "log.dirs": str(self.data_dir),
            # One node: every replication factor and min ISR must be 1.
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Internal topics default to 50 partitions each: slow to create on
            # first use and pointless for one broker.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.num.partitions": "1",
            # Tests: no 3 s wait before the first consumer group rebalance.
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            # Sized for a 2-core machine shared with the code under test.
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "num.replica.fetchers": "1",
            # Above the largest batch the bridge may send (BRIDGE_MAX_BODY_BYTES is at
            # most 64 MiB): Kafka refuses a batch over its topic's segment.bytes
            # (RECORD_LIST_TOO_LARGE). Segments are not preallocated on Linux.
            "log.segment.bytes": str(128 * 1024 * 1024),
            # After an unclean stop (SIGKILL, crash) the restarted broker is
            # refused (DUPLICATE_BROKER_REGISTRATION) until its previous
            # incarnation's session expires: 9 s by default. The heartbeat
            # goes over loopback to the same JVM, so a shorter session is
            # safe, while 4 s still rides out GC pauses on a busy machine.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "4000",
            "log.retention.check.interval.ms": "60000",
            **self.extra_properties,
        }
        lines = ["# Written by bridge/devkafka.py; rewritten on every start."]
        lines += [f"{key}={value}" for key, value in props.items()]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        _write_if_changed(self.config_file, self.server_properties())

    def _java(self) -> str:
        """Find Java once per broker (each lookup runs ``java -version``)."""
        if self._java_path is None:
            self._java_path = find_java()
        return self._java_path

    def _java_cmd(self, main: str, *args: str) -> list[str]:
        """Build the JVM command line for one of Kafka's main classes."""
        libs = ensure_jars(self.home)
        return [
            self._java(),
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            # log4j's own shutdown hook would stop logging halfway through
            # Kafka's shutdown ("Unable to register Log4j shutdown hook ...
            # Using SimpleLogger"); without it the log shows the whole stop.
            "-Dlog4j2.shutdownHookEnabled=false",
            f"-Dlog4j2.configurationFile={log4j_config(self.home)}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def is_formatted(self) -> bool:
        """Whether log.dirs already holds a formatted KRaft storage."""
        return (self.data_dir / "meta.properties").is_file()

    def format(self) -> None:
        """Format the storage with a fresh cluster id, unless already done.

        Needed once before the first start; reformatting would throw away
        the topics, so an existing storage is kept.
        """
        self._write_config()
        if self.is_formatted():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster_id = _random_cluster_id()
        # StorageTool is short-lived: -Xmx as for the broker, no -Xms.
        cmd = self._java_cmd(
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "--cluster-id",
            cluster_id,
            "--config",
            str(self.config_file),
            *self.format_args,
        )
        cmd.remove(f"-Xms{self.heap}")
        result = _run(cmd)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            msg = f"formatting {self.data_dir} failed (exit {result.returncode}):\n{output}"
            raise DevKafkaError(msg)

    def start(self) -> None:
        """Spawn the broker (formatting first if needed); returns at once.

        Call wait_ready() before using it. The previous log, if any, is kept
        as ``<log>.1`` so a failed run can still be read after a restart.
        """
        if self.is_running():
            msg = f"broker on port {self.port} already started (pid {self.pid})"
            raise DevKafkaError(msg)
        roles = [
            (self.port, "the broker's port (KAFKA_PORT)"),
            (self.controller_port, "its controller port (KAFKA_CONTROLLER_PORT)"),
            *((x.port, f"its {x.name} listener's port") for x in self.listeners),
        ]
        for port, role in roles:
            if not _port_bindable(port):
                msg = (
                    f"port {port} on 127.0.0.1, {role}, is already in use by another "
                    "process: choose free ports (make run KAFKA_PORT=19092 takes 19092 "
                    "and 19093), or point the bridge at a Kafka you run with "
                    "BRIDGE_KAFKA_BOOTSTRAP"
                )
                raise DevKafkaError(msg)
        self._java()  # fail with the clear message before touching anything
        self.format()
        cmd = self._java_cmd("kafka.Kafka", str(self.config_file))
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if self.log_file.exists() and self.log_file.stat().st_size > 0:
            self.log_file.replace(self.log_file.with_name(f"{self.log_file.name}.1"))
        with self.log_file.open("ab") as log:
            log.write(f"# devkafka: {' '.join(cmd)}\n".encode())
            log.flush()
            self._log_start = log.tell()
            preexec = dies_with_parent() if self.die_with_parent else None

            def spawn() -> subprocess.Popen[bytes]:
                return subprocess.Popen(  # noqa: S603 - argument list, no shell
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir.parent,
                    start_new_session=True,
                    preexec_fn=preexec,  # noqa: PLW1509 - see dies_with_parent
                )

            self._proc = from_a_lifelong_thread(spawn) if self.die_with_parent else spawn()

    def log_shows_started(self) -> bool:
        """Whether this run's log (not an earlier one) reports the server up."""
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(self._log_start)
                return STARTED_MARKER.encode() in fh.read()
        except FileNotFoundError:
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until clients can use the broker, or raise DevKafkaError.

        Ready means: the process lives, its log says the server started (the
        broker is unfenced) and it answers a Kafka request on the port. If
        the process dies, the error carries the tail of its log, which
        usually names the cause (a port in use, a bad config).
        """
        if self._proc is None:
            msg = "wait_ready() called before start()"
            raise DevKafkaError(msg)
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                msg = (
                    f"Kafka broker exited with code {code} during startup; "
                    f"log {self.log_file}:\n{_log_excerpt(self.log_file, self._log_start)}"
                )
                raise DevKafkaError(msg)
            if self.log_shows_started() and probe(self.port):
                return
            if time.monotonic() >= deadline:
                msg = (
                    f"Kafka broker not ready after {timeout:.0f} s (still running, "
                    f"pid {self._proc.pid}); log {self.log_file}:\n"
                    f"{_log_excerpt(self.log_file, self._log_start)}"
                )
                raise DevKafkaError(msg)
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the broker: SIGTERM to its group, SIGKILL after ``timeout``.

        A clean SIGTERM shutdown keeps the next start with the same data fast.
        Safe to call more than once.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        self._proc = None

    def detach(self) -> int:
        """Forget the process without stopping it (for the CLI's ``up``).

        Returns its pid; stop it later with stop_pid().
        """
        if self._proc is None:
            msg = "detach() called before start()"
            raise DevKafkaError(msg)
        pid = self._proc.pid
        # Popen would warn that the child still runs; it is meant to.
        self._proc.returncode = 0
        self._proc = None
        return pid

    def __enter__(self) -> Self:
        """Start and wait until ready; stop again if that fails."""
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the broker."""
        self.stop()


def _check_listeners(listeners: Sequence[Listener], taken: Sequence[int]) -> None:
    """Refuse extra listeners the broker would refuse, with a one-line reason."""
    names = [x.name for x in listeners]
    ports = [*taken, *(x.port for x in listeners)]
    for listener in listeners:
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", listener.name):
            msg = f"listener name must be upper-case letters, digits or _, not {listener.name!r}"
            raise ValueError(msg)
        if listener.name in _RESERVED_LISTENERS:
            msg = f"listener name {listener.name} is taken by the broker's own listeners"
            raise ValueError(msg)
        if listener.protocol not in _SECURITY_PROTOCOLS:
            msg = f"listener {listener.name}: unknown security protocol {listener.protocol!r}"
            raise ValueError(msg)
    if len(set(names)) != len(names) or len(set(ports)) != len(ports):
        msg = f"listener names and ports must all differ: {names} on {ports}"
        raise ValueError(msg)


def _random_cluster_id() -> str:
    """Make a cluster id as ``kafka-storage random-uuid`` does, minus a JVM start.

    The format is a UUID's 16 bytes in base64url without padding. Like Kafka's
    own ``Uuid.randomUuid``, never one starting with "-": StorageTool would take
    it for an option and refuse to format (one start in 64 failed that way).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


# --------------------------------------------------------------------------
# Command line


def _paths(home: Path, port: int) -> tuple[Path, Path, Path]:
    """Name the data dir, log file and pid file of the CLI's broker on ``port``."""
    return home / f"data-{port}", home / f"broker-{port}.log", home / f"broker-{port}.pid"


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text(encoding="utf-8").strip())
    except (FileNotFoundError, ValueError):
        return None


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP while ``up`` waits: raised so the broker it started is stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} received")
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Generator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Interrupted` (as SIGINT is KeyboardInterrupt)
    while the block runs; later ones are ignored, so the cleanup they caused finishes.
    SIGHUP not when it is ignored (``nohup make run``), as by ``bridge serve``."""
    stops = tuple(sig for sig in stop_signals() if sig != signal.SIGINT)

    def interrupt(signum: int, _: object) -> None:
        for sig in stops:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _cmd_fetch(args: argparse.Namespace, out: IO[str]) -> int:
    started = time.monotonic()
    libs = ensure_jars(args.home)
    print(f"Kafka {KAFKA_VERSION} jars in {libs} ({time.monotonic() - started:.1f} s)", file=out)
    return 0


def _port_lock(home: Path, port: int) -> contextlib.AbstractContextManager[None]:
    """One `up` or `down` of a port at a time: a second `up` (`make run` in two
    terminals) took the broker the first was still booting for an unresponsive one
    and killed it. The second now waits, then finds it up."""
    return _locked(home / f"broker-{port}.lock")


def _cmd_up(args: argparse.Namespace, out: IO[str]) -> int:
    home: Path = args.home.resolve()
    with _port_lock(home, args.port):
        return _up(args, out, home)


def _up(args: argparse.Namespace, out: IO[str], home: Path) -> int:
    data_dir, log_file, pid_file = _paths(home, args.port)
    config_file = config_file_of(data_dir)
    pid = _read_pid(pid_file)
    if probe(args.port):
        if pid is not None and _is_broker_pid(pid, config_file):
            print(
                f"Kafka already up at 127.0.0.1:{args.port} (pid {pid}); log {log_file}", file=out
            )
        else:
            # Another checkout's broker, or one the user runs: used, but not ours to
            # stop, and its log is not this checkout's (a review found both said).
            print(
                f"a Kafka not started from {home} answers at 127.0.0.1:{args.port}: using "
                f"it; `make kafka-down` will not stop it (KAFKA_PORT=... starts one of "
                "this checkout's on another port)",
                file=out,
            )
        return 0
    if pid is not None and _is_broker_pid(pid, config_file):
        # Started by an earlier `up` that was interrupted, or still booting:
        # replace it rather than guess how long it will take.
        print(f"stopping unresponsive broker pid {pid}", file=out)
        stop_pid(pid, config_file)
    pid_file.unlink(missing_ok=True)

    kafka = LocalKafka(
        home,
        data_dir,
        args.port,
        args.controller_port,
        heap=args.heap,
        log_file=log_file,
    )
    started = time.monotonic()
    fresh = not kafka.is_formatted()
    # The pid file is written as soon as the broker runs, so that `down` can stop it
    # even if this command is killed (SIGKILL) while the broker boots; a failure or
    # SIGTERM/SIGHUP/Ctrl-C here stops the broker and removes the file.
    with _signals_interrupt():
        try:
            kafka.start()
            pid_file.write_text(f"{kafka.pid}\n", encoding="utf-8")
            kafka.wait_ready(args.timeout)
        except BaseException:
            kafka.stop()
            # A signal that lands inside start(), after the fork but before Popen
            # returned, leaves a broker LocalKafka does not know: found by its
            # command line (this port's config file) instead.
            for orphan in _brokers_running_from(config_file):
                stop_pid(orphan, config_file)
            pid_file.unlink(missing_ok=True)
            raise
        pid = kafka.detach()
    kind = "fresh start" if fresh else "restart"
    print(
        f"Kafka {KAFKA_VERSION} up at {kafka.bootstrap} (pid {pid}, "
        f"{kind} in {time.monotonic() - started:.1f} s)\n"
        f"log: {log_file}",
        file=out,
    )
    return 0


def _cmd_down(args: argparse.Namespace, out: IO[str]) -> int:
    home: Path = args.home.resolve()
    with _port_lock(home, args.port):
        return _down(args, out, home)


def _down(args: argparse.Namespace, out: IO[str], home: Path) -> int:
    data_dir, _, pid_file = _paths(home, args.port)
    config_file = config_file_of(data_dir)
    pid = _read_pid(pid_file)
    if pid is None:
        # The pid file lost (deleted with a clean-up, say): the broker is still found
        # by its command line, which names this checkout's config file.
        running = _brokers_running_from(config_file)
        for orphan in running:
            stop_pid(orphan, config_file, args.timeout)
            print(f"stopped Kafka on port {args.port} (pid {orphan}, no pid file)", file=out)
        if not running:
            print(f"no broker to stop (no pid file {pid_file})", file=out)
        return 0
    if stop_pid(pid, config_file, args.timeout):
        print(f"stopped Kafka on port {args.port} (pid {pid})", file=out)
    else:
        print(f"no broker was running (stale pid file {pid_file} removed)", file=out)
    pid_file.unlink(missing_ok=True)
    return 0


def _cmd_status(args: argparse.Namespace, out: IO[str]) -> int:
    data_dir, log_file, pid_file = _paths(args.home.resolve(), args.port)
    if probe(args.port):
        pid = _read_pid(pid_file)
        mine = pid is not None and _is_broker_pid(pid, config_file_of(data_dir))
        owner = f" (pid {pid})" if mine else ""
        print(f"up: 127.0.0.1:{args.port}{owner}; log {log_file}", file=out)
        return 0
    print(f"down: nothing answers Kafka requests on 127.0.0.1:{args.port}", file=out)
    return 1


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home",
        type=Path,
        default=DEFAULT_HOME,
        help="jar cache, data, logs and pid files (default: %(default)s)",
    )
    common.add_argument("--port", type=int, default=DEFAULT_PORT, help="client port")
    common.add_argument(
        "--controller-port", type=int, default=None, help="KRaft controller port (default: port+1)"
    )
    common.add_argument("--heap", default=DEFAULT_HEAP, help="JVM heap (default: %(default)s)")
    common.add_argument(
        "--timeout", type=float, default=90.0, help="seconds to wait for start/stop"
    )
    parser = argparse.ArgumentParser(
        prog="python -m bridge.devkafka",
        description=f"Single-node Apache Kafka {KAFKA_VERSION} for development and tests.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", parents=[common], help="only download the jars")
    sub.add_parser("up", parents=[common], help="start a detached broker and wait for it")
    sub.add_parser("down", parents=[common], help="stop the broker started by 'up'")
    sub.add_parser("status", parents=[common], help="exit 0 if a broker answers, else 1")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.controller_port is None:
        args.controller_port = args.port + 1
    commands = {"fetch": _cmd_fetch, "up": _cmd_up, "down": _cmd_down, "status": _cmd_status}
    try:
        return commands[args.command](args, sys.stdout)
    except (DevKafkaError, ValueError, OSError) as exc:  # OSError: a full disk, say
        sys.stderr.write(f"devkafka: error: {exc}\n")
        return 1
    except Interrupted as exc:
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
