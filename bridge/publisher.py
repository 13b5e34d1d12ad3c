"""The Kafka side: one idempotent aiokafka producer per process.

With :mod:`bridge.handover`, the only module on the request path that imports
aiokafka. Every await on the
broker has a deadline (aiokafka can otherwise wait forever while the broker is
unreachable with idempotence on), and the background tasks it owns report
their death loudly instead of vanishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import math
import ssl
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator
from types import SimpleNamespace
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    IllegalSaslStateError,
    InvalidTimestampError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    RecordListTooLargeError,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

import bridge.kafkafixes  # noqa: F401  (mends aiokafka's client when imported)
from bridge.config import PRODUCER_MAX_REQUEST_BYTES, Settings
from bridge.deadlines import Watchdog
from bridge.errors import (
    BridgeError,
    ConfigError,
    PayloadTooLarge,
    PublishFailed,
    PublishTimeout,
    Unavailable,
)
from bridge.handover import DirectHandover
from bridge.metrics import Metrics
from bridge.partitioner import KeyPartitioner, partition_for
from bridge.routing import Destination

log = logging.getLogger(__name__)

#: How often the producer's view of the cluster is refreshed to prove it is alive.
HEARTBEAT_SECONDS = 5.0

#: At most this often, a failed connection in the background (Kafka unreachable at
#: startup, a producer replaced) asks why, to log a refusal of the bridge's credentials
#: or TLS settings (each time one more connection per bootstrap server).
EXPLAIN_SECONDS = 30.0
#: Metadata older than this makes the bridge unready. Four heartbeats: after a
#: refresh at t, the next starts at t + 5 s and may time out at t + 10 s, and the one
#: after it starts at t + 15 s and may take up to 5 s more. At three heartbeats one
#: timed-out refresh made the bridge unready (and paused the drainer) until the next
#: came back, while Kafka was answering; two in a row still do.
STALE_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS
#: Broker-mode deliveries get their 503 at once when Kafka has answered nothing for
#: this long: no metadata refresh and no acknowledgement. Longer than
#: STALE_AFTER_SECONDS, so /readyz has taken the bridge out of rotation by then.
UNANSWERED_AFTER_SECONDS = STALE_AFTER_SECONDS + HEARTBEAT_SECONDS
#: Broker mode: how long a publish that timed out, with Kafka answering no record since
#: it began, keeps the bridge unready (see KafkaPublisher.stalled). As long as stale
#: metadata does: long enough for a load balancer's probes to see it, short enough that
#: the traffic that comes back once it ends finds a recovered Kafka soon.
STALLED_FOR_SECONDS = STALE_AFTER_SECONDS
#: How often a run of failed metadata refreshes (an outage) is logged again.
REFRESH_FAILED_REPEAT_SECONDS = 60.0
#: The least time between two WARNING lines saying Kafka throttles the bridge.
THROTTLE_SAID_EVERY_SECONDS = 60.0
#: Broker mode: the bridge is unready once Kafka refused records' timestamps and took
#: none for this long (see clock_refused); the refusals then say so at most this often.
CLOCK_REFUSED_FOR_SECONDS = STALE_AFTER_SECONDS
CLOCK_SAID_EVERY_SECONDS = 60.0
#: How long after a throttle ends the bridge still counts as throttled (see throttled):
#: what waited behind it (a metadata request, records for room) comes a moment later.
THROTTLE_AFTERMATH_SECONDS = 2 * HEARTBEAT_SECONDS
#: The longest wait between two tries of secret files a rotation could not connect with.
ROTATION_RETRY_MAX_SECONDS = 60.0
#: Why a producer did not start, as bridge_kafka_secret_rotations_total counts it:
#: the secrets are the problem (Kafka refused them, or the files cannot be used)...
REFUSED = "refused"
#: ...or something else is (Kafka unreachable or too slow): says nothing of the secrets.
FAILED = "failed"
#: How long closing a producer by force may take (it waits for no broker).
FORCE_CLOSE_SECONDS = 1.0
#: The longest wait between two tries to replace a producer that can no longer send
#: (Kafka away: each try fails). Once Kafka answers a metadata refresh again the next
#: try comes at once (_heartbeat).
RESET_RETRY_MAX_SECONDS = 5.0
#: The shortest time between two replacements: a topic that refuses record after record
#: (too small a max.message.bytes, missing rights) must not make the bridge churn producers.
RESET_MIN_INTERVAL_SECONDS = 1.0


class Publisher(Protocol):
    """What the rest of the bridge uses of :class:`KafkaPublisher`; unit tests pass fakes."""

    @property
    def connected(self) -> bool: ...

    @property
    def stalled(self) -> bool: ...

    @property
    def throttled(self) -> bool:
        """Kafka throttles the producer (a client quota), or did a moment ago."""
        ...

    @property
    def clock_refused(self) -> bool:
        """Kafka refuses the records' timestamps and takes none (the host's clock)."""
        ...

    def answered_since(self, since: float) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self, deadline: float | None = None) -> None: ...

    def ready_for(self, topic: str) -> bool: ...

    def metadata_lacks(self, topic: str, since: float) -> bool: ...

    async def hand_over(self, destination: Destination) -> asyncio.Future[Any]: ...

    async def send(self, destination: Destination) -> asyncio.Future[Any]: ...

    async def publish(self, destination: Destination) -> None: ...

    def refuse_at_once(self) -> None: ...

    @property
    def denied(self) -> str | None:
        """Why Kafka's authorizer refuses the producer its start, while it does."""
        ...

    def failure(self, exc: BaseException) -> BridgeError: ...


#: A 503's detail while Kafka refuses the bridge (the ACLs are not the sender's to know).
DENIED_ANSWER = "Kafka refuses the bridge (see its log)"

#: Kafka's refusals of a batch for its size: over the topic's max.message.bytes, or
#: (RECORD_LIST_TOO_LARGE) its segment.bytes. Either may be the batch's and not the
#: record's own (see publish). The second was taken for a passing error: the topic held
#: for ever behind the record (durable, memory), a 503 and no dead letter (broker).
BATCH_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
#: ... and the producer's own refusal of a record over max_request_size.
TOO_LARGE_FOR_KAFKA = (*BATCH_TOO_LARGE, RecordTooLargeError)


def _denial(settings: Settings, exc: KafkaError) -> str:
    """What Kafka's authorizer refusing the producer its start means, and the fix."""
    user = f"User:{settings.kafka_sasl_username}" if settings.kafka_sasl_username else "its user"
    if isinstance(exc, ClusterAuthorizationFailedError):
        what = "IdempotentWrite on the cluster (or WRITE on the topics it publishes to)"
    else:
        what = "DESCRIBE and WRITE on the topics it publishes to"
    return (
        f"Kafka at {settings.kafka_bootstrap} denies the bridge ({user}) {what}: grant "
        f"it with kafka-acls ({type(exc).__name__})"
    )


def refused_by_kafka(failure: BaseException) -> bool:
    """Whether a record's failure is Kafka's answer (a refusal: denied, invalid, too
    large, out of order), not the lack of one (a timeout, an unreachable or leaderless
    partition, a record the producer dropped)."""
    if isinstance(failure, KafkaTimeoutError):
        return False
    if isinstance(failure, KafkaError):
        return not failure.retriable
    return isinstance(failure, BridgeError)  # the bridge's own verdict on Kafka's answer


def secrets_fingerprint(settings: Settings) -> bytes:
    """A digest of what the Kafka secret files hold now (empty: no such files).

    A file that cannot be read counts as different content: whoever rotates it may
    be halfway, and the next look sees the finished file.
    """
    files = settings.kafka_secret_files()
    if not files:
        return b""
    digest = hashlib.sha256()
    for path in files:
        try:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError:
            digest.update(b"unreadable " + str(path).encode())
    return digest.digest()


def kafka_client_options(settings: Settings) -> dict[str, Any]:
    """Connection options shared by the producer, the admin client and consumers.

    Each waits BRIDGE_KAFKA_REQUEST_TIMEOUT for a broker's answer, the operator
    commands' clients too (with the Kafka client's default, a broker that hung held
    a tail or a dead-letter replay 40 s before it tried another).
    Password and TLS files are read on each call (a new TLS context each time).
    Raises ConfigError when they became unusable since the settings were loaded.
    """
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": settings.kafka_client_id,
        "security_protocol": protocol,
        # rounded up: a legal 0.0005 s was 0 ms
        "request_timeout_ms": math.ceil(settings.kafka_request_timeout * 1000),
    }
    try:
        if protocol.startswith("SASL_"):
            options["sasl_mechanism"] = settings.kafka_sasl_mechanism
            options["sasl_plain_username"] = settings.kafka_sasl_username
            options["sasl_plain_password"] = settings.kafka_sasl_secret()
        if protocol.endswith("SSL"):
            options["ssl_context"] = settings.kafka_ssl_context()
    except OSError as exc:
        raise ConfigError(f"cannot read a Kafka secret: {exc}") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return options


async def kafka_diagnosis(
    settings: Settings, options: dict[str, Any]
) -> tuple[str | None, str | None]:
    """Why Kafka refuses the bridge's credentials or TLS settings, if it does; else a
    hint at why it does not answer, if there is one.

    aiokafka reports any failed bootstrap as ``KafkaConnectionError("Unable to
    bootstrap ...")`` and only logs the cause, so this opens one connection per
    bootstrap server itself, the same way, and asks for metadata, to see it. No
    refusal when no server refused the settings (unreachable, slow, or fine by now).
    The hint: a server that took the connection and closed it at a request, as a
    listener needing TLS or SASL does with a client that has neither (a forgotten
    BRIDGE_KAFKA_SECURITY_PROTOCOL was told "is Kafka running?"). Only a hint: a broker
    at its connection limit, or stopping, does the same, so it is retried, not refused.
    """
    security = {k: v for k, v in options.items() if k.startswith(("security_", "ssl_", "sasl_"))}
    hint = None
    for host, port, _ in collect_hosts(settings.kafka_bootstrap, randomize=False):
        where = f"{host}:{port}"
        try:
            async with asyncio.timeout(settings.kafka_connect_timeout):
                conn = await create_conn(
                    host,
                    port,
                    client_id=settings.kafka_client_id,
                    request_timeout_ms=math.ceil(settings.kafka_connect_timeout * 1000),
                    **security,
                )
                try:
                    await conn.send(MetadataRequest([]))
                finally:
                    conn.close()
        except (KafkaError, OSError, TimeoutError) as exc:
            # a TLS alert from the broker arrives as "connection closed", caused by it
            cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
            refusal = _refusal(settings, where, cause)
            if refusal is not None:
                return refusal, None
            if hint is None and isinstance(exc, KafkaConnectionError) and "closed" in str(exc):
                hint = _closed_hint(settings, where)
            log.debug("Kafka at %s: %r", where, exc)
    return None, hint


def _closed_hint(settings: Settings, where: str) -> str:
    protocol = settings.kafka_security_protocol
    needs = {"PLAINTEXT": "TLS or SASL", "SSL": "SASL", "SASL_PLAINTEXT": "TLS"}.get(protocol)
    does = f"a listener that needs {needs} does that: " if needs else ""
    return (
        f"Kafka at {where} took the connection and closed it at the first request; {does}"
        f"check BRIDGE_KAFKA_SECURITY_PROTOCOL={protocol} and the port"
    )


def _refusal(settings: Settings, where: str, exc: BaseException) -> str | None:  # noqa: PLR0911
    """The message for an error that says the security settings are wrong, else None."""
    if isinstance(exc, SaslAuthenticationFailed):
        detail = exc.args[0] if exc.args and isinstance(exc.args[0], str) else exc.description
        return (
            f"Kafka at {where} rejected the credentials of user {settings.kafka_sasl_username} "
            f"({settings.kafka_sasl_mechanism}): {detail}; check BRIDGE_KAFKA_SASL_USERNAME "
            "and BRIDGE_KAFKA_SASL_PASSWORD(_FILE)"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return (
            f"Kafka at {where} does not offer BRIDGE_KAFKA_SASL_MECHANISM="
            f"{settings.kafka_sasl_mechanism} ({exc})"
        )
    if isinstance(exc, IllegalSaslStateError):
        return (
            f"Kafka at {where} does not expect SASL on that port: check "
            f"BRIDGE_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol} and the port"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        hostname = " and BRIDGE_KAFKA_SSL_CHECK_HOSTNAME" if "match" in str(exc) else ""
        return (
            f"the TLS certificate of Kafka at {where} was not accepted: "
            f"{exc.verify_message or exc.reason}; check BRIDGE_KAFKA_SSL_CAFILE{hostname}"
        )
    if isinstance(exc, ConnectionResetError) and settings.kafka_security_protocol.endswith("SSL"):
        # Reset during the TLS handshake, the TCP connection made: a plaintext listener
        # reads the ClientHello as a request hundreds of MB long and hangs up. That was
        # taken for Kafka unreachable, retried for ever with no reason given.
        return (
            f"Kafka at {where} closed the connection during the TLS handshake: is that "
            "port a TLS listener? check BRIDGE_KAFKA_SECURITY_PROTOCOL="
            f"{settings.kafka_security_protocol} and the port"
        )
    if isinstance(exc, ssl.SSLError):
        hint = (
            "check BRIDGE_KAFKA_SSL_CERTFILE and BRIDGE_KAFKA_SSL_KEYFILE: the listener may "
            "require a client certificate signed by a CA it trusts"
            if "CERTIFICATE" in str(exc.reason)
            else "check BRIDGE_KAFKA_SECURITY_PROTOCOL and the BRIDGE_KAFKA_SSL_* settings"
        )
        return f"Kafka at {where} refused the TLS connection ({exc.reason or exc}); {hint}"
    return None


def check_record_size(destination: Destination, limit: int) -> None:
    """Raise PayloadTooLarge (413) for an event whose record would exceed ``limit``.

    The body limit alone does not bound the record: its headers come from the
    delivery too (ce_subject from the body's ``id``, say). An event accepted with
    2xx and then refused by the producer would be lost, dead letter included.
    """
    size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        destination.key, destination.value, destination.headers
    )
    if size > limit:
        raise PayloadTooLarge(
            f"the event would make a Kafka record of {size} bytes with its headers; "
            f"at most {limit} bytes are accepted"
        )


def spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Start a background task whose unexpected death is logged, not swallowed."""
    task = asyncio.get_running_loop().create_task(coro, name=name)

    def _report(done: asyncio.Task[None]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.error("background task %s died", name, exc_info=done.exception())

    task.add_done_callback(_report)
    return task


#: aiokafka 0.14's known errors as a producer ends, uncaught in its callbacks: (the
#: exception's type, the function raising it, the file it is in).
_AIOKAFKA_END_ERRORS = (
    # The sender task of a producer ends with an exception (closed during an outage):
    # its done-callback fails the records it held, then calls fatal_error, which needs
    # a transaction a non-transactional producer never has (AttributeError on None).
    (AttributeError, "fatal_error", "aiokafka/producer/transaction_manager.py"),
    # A producer force-closed while Kafka hangs: a batch's done-callback removes the
    # batch from the pending ones, which the failure of every batch already did.
    (KeyError, "cb", "aiokafka/producer/message_accumulator.py"),
)


def _aiokafka_sender_end(context: dict[str, Any]) -> bool:
    """Whether ``context`` (the event loop's, for an exception nobody caught) is one
    of aiokafka's known errors at a producer's end (_AIOKAFKA_END_ERRORS)."""
    exc = context.get("exception")
    if exc is None:
        return False
    frame = exc.__traceback__
    while frame is not None:
        code = frame.tb_frame.f_code
        path = code.co_filename.replace("\\", "/")
        for kind, function, file in _AIOKAFKA_END_ERRORS:
            if isinstance(exc, kind) and code.co_name == function and path.endswith(file):
                return True
        frame = frame.tb_next
    return False


def quiet_aiokafka_sender_end(loop: asyncio.AbstractEventLoop) -> None:
    """Log aiokafka's known errors at a producer's end at DEBUG, not as the loop's
    ERROR traceback, which reads as a crash ("Exception in callback
    Sender._fail_all", "... MessageAccumulator._pop_batch.<locals>.cb"); every other
    uncaught exception goes where it went."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiets_aiokafka", False):
        return  # once per loop

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if _aiokafka_sender_end(context):
            log.debug("a Kafka producer's sender ended: %r", context["exception"])
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.quiets_aiokafka = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


#: What publish() knows of the batch of a record sent alone.
_ALONE = SimpleNamespace(record_count=1)


def landed(future: asyncio.Future[Any]) -> bool:
    """Whether ``future`` (a record's or its batch's) says Kafka took the record."""
    return future.done() and not future.cancelled() and future.exception() is None


def _records_undelivered(producer: AIOKafkaProducer) -> int:
    """How many records ``producer`` holds that Kafka has not acknowledged (queued or in
    flight); -1 when aiokafka's internals changed shape."""
    try:
        accumulator = producer._message_accumulator
        queued = itertools.chain(*accumulator._batches.values())
        batches = itertools.chain(queued, accumulator._pending_batches)
        return sum(batch.record_count for batch in batches if not batch.future.done())
    except Exception:
        return -1


def _alone(batch: Any) -> bool:
    """Whether ``batch`` (aiokafka's MessageBatch, or None when unknown) held one
    record: Kafka's refusal of it as too large is then that record's own."""
    return getattr(batch, "record_count", None) == 1


@contextlib.contextmanager
def _cancelled_when(event: asyncio.Future[None]) -> Iterator[Callable[[], bool]]:
    """Cancel the current task if ``event`` resolves while the block runs; yields a
    function that tells, once the block ended in CancelledError, whether that was
    this cancellation alone (then it is no longer pending on the task).

    The waiting stays in the caller's task, not in a task of its own: a record
    appended by a send that finished stays the caller's, whatever deadline then
    passes (with a task in between, a deadline passing as it finished told the
    caller "not handed over" about a record that was, and the drainer sent it
    twice), and the caller's own cancellation is never mistaken for this one, as
    asyncio.timeout tells its own apart (Task.cancelling, Task.uncancel).
    """
    task = asyncio.current_task()
    if task is None:  # not reached: called from a coroutine
        raise RuntimeError("_cancelled_when needs a task")
    cancelling = task.cancelling()
    state = {"active": True, "fired": False}

    def fire(_: asyncio.Future[None]) -> None:
        if state["active"]:  # a callback may run after the block ended: then nothing
            state["fired"] = True
            task.cancel()

    def moved() -> bool:
        return state["fired"] and task.uncancel() <= cancelling

    event.add_done_callback(fire)
    try:
        yield moved
    finally:
        state["active"] = False
        event.remove_done_callback(fire)


class KafkaPublisher:
    """Publishes :class:`Destination` records and reports whether Kafka is reachable."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._timeout = settings.publish_timeout
        self._deadlines = Watchdog(settings.publish_timeout)
        self._producer: AIOKafkaProducer | None = None
        self._handover: DirectHandover | None = None  # the producer's fast way in
        # Resolved when the producer in use is replaced or stopped (see _send_through)
        self._replaced: asyncio.Future[None] | None = None
        self._max_request_size = PRODUCER_MAX_REQUEST_BYTES
        self._answered_until = 0.0  # see UNANSWERED_AFTER_SECONDS
        self._answered_at = 0.0  # perf_counter of Kafka's last answer (answered_since)
        self._record_answered_at = 0.0  # of its last answer to a record (stalled)
        # Stalls are told in broker mode only: elsewhere only the drainer's set-asides
        # and replays publish this way, and records the drainer sends, which go around
        # publish(), would never end one.
        self._broker_mode = settings.ack == "broker"
        self._stall_began: float | None = None  # of the first timeout of a stall, until
        # Kafka takes a record published after it
        self._stalled_until = 0.0  # the stall holds until then, unless it ends before
        self._tasks: list[asyncio.Task[None]] = []
        # Rotation of the secret files (see _check_secrets)
        self._fingerprint = b""  # of the secrets the producer in use was made with
        self._rotation: asyncio.Task[None] | None = None  # connecting with the new files
        self._retiring: set[asyncio.Task[None]] = set()  # replaced producers flushing
        # The deadlines of the flushes under way: stop() brings a replaced producer's
        # (BRIDGE_SHUTDOWN_TIMEOUT from its replacement) forward to its own.
        self._flushes: set[asyncio.Timeout] = set()
        self._failed_fingerprint = b""  # of the files the last failed rotation tried
        self._rotation_backoff = 0.0
        self._rotation_not_before = 0.0
        self._explain_not_before = 0.0  # see _connect
        #: Why Kafka's authorizer refused the producer its start, while it does (see
        #: _start_producer): readiness and the replay say it, not "not connected".
        self.denied: str | None = None
        self._denial: str | None = None  # the last _start_producer's
        # Replacing a producer Kafka refused a record from (see _after_ack)
        self._watch: Callable[[asyncio.Future[Any]], None] | None = None
        self._broken: AIOKafkaProducer | None = None
        self._reset_backoff = 0.0
        self._reset_not_before = 0.0
        self._reset_timer: asyncio.TimerHandle | None = None  # a reset that had to wait
        # Heartbeats (see _refresh_failed): when Kafka last answered one (or a producer
        # started; the metadata is fresh for STALE_AFTER_SECONDS after), whether the last
        # failed, when a failure was last said at WARNING, and whether the current run of
        # failures was said
        self._refreshed_at = -STALE_AFTER_SECONDS
        # When the producer in use last got any metadata response (see _metadata_age)
        self._metadata_at = -math.inf
        self._metadata_before = -math.inf  # the one before it (see metadata_lacks)
        self._refresh_failing = False
        self._refresh_failure_said = -REFRESH_FAILED_REPEAT_SECONDS
        self._refresh_run_said = False
        # Until when (monotonic) Kafka asked the producer to hold back, and when that
        # was last said (see _on_throttle)
        self._throttled_until = -math.inf
        self._throttle_said = -THROTTLE_SAID_EVERY_SECONDS
        # When (perf_counter) Kafka last refused a record's timestamp, last acknowledged
        # a record published here, and the refusal was last said (see clock_refused).
        # _landed_at is set where an acknowledgement is seen: by the watch on a
        # record's own future (_after_ack), and, for a record whose deadline cancelled
        # that future (which the watch then ignores) but whose batch landed, by
        # _published and _published_late.
        self._clock_refused_at = -math.inf
        self._landed_at = -math.inf
        self._clock_said = -CLOCK_SAID_EVERY_SECONDS
        self._broken_by_clock = False  # the producer broke on a timestamp's refusal

    @property
    def connected(self) -> bool:
        """True while the producer runs and its cluster metadata is recent: from a
        heartbeat, or from any refresh aiokafka completed. A heartbeat stops waiting
        after HEARTBEAT_SECONDS, and the refresh it started goes on: drawing a hung
        broker first, it waits up to BRIDGE_KAFKA_REQUEST_TIMEOUT before it asks the
        next one. Heartbeats alone made a cluster with one hung broker, whose others
        answered, look stale (a reviewer's SIGSTOP of one of three)."""
        if self._producer is None:
            return False
        if time.monotonic() < self._refreshed_at + STALE_AFTER_SECONDS:
            return True
        # A throttled Kafka answers, a throttle time later: the heartbeats' requests
        # wait behind it, and a throttled bridge was called unreachable (a review).
        if self.throttled:
            return True
        return self._metadata_age() < STALE_AFTER_SECONDS

    @property
    def throttled(self) -> bool:
        """Kafka throttles the producer (a client quota), or did a moment ago."""
        return time.monotonic() < self._throttled_until + THROTTLE_AFTERMATH_SECONDS

    def _on_throttle(self, seconds: float) -> None:
        """Kafka answered a produce request asking the producer to hold back its
        requests ``seconds`` (the sender does, see bridge.kafkafixes): counted, said at
        most once a minute, and an answer from Kafka all the same."""
        now = time.monotonic()
        self._metrics.kafka_throttle.inc(seconds)
        self._throttled_until = max(self._throttled_until, now + seconds)
        self._answered()
        if now - self._throttle_said >= THROTTLE_SAID_EVERY_SECONDS:
            self._throttle_said = now
            log.warning(
                "Kafka throttles the bridge (%.0f ms): a client quota on client id %s (or "
                "its user) is below its traffic; broker mode answers 503 to what waits past "
                "BRIDGE_PUBLISH_TIMEOUT, durable and memory modes queue the events (said at "
                "most every %g s, counted in bridge_kafka_throttle_seconds_total)",
                seconds * 1000,
                self._settings.kafka_client_id,
                THROTTLE_SAID_EVERY_SECONDS,
            )

    @property
    def stalled(self) -> bool:
        """Kafka takes no record a publish waits for, whatever it answers to metadata
        (what makes a broker-mode bridge unready while ``connected``).

        A stall begins when a publish times out after its record was handed over while
        Kafka answered no record (took none, refused none) since that publish began.
        That is a cluster below its quorum (acks=all is refused as NOT_ENOUGH_REPLICAS,
        which the producer retries until the record's time is up) or partitions left
        without a leader: each request waits the whole publish timeout for its 503,
        and used to while /readyz said 200.

        It ends when Kafka takes a record published after it began: one published
        before may still be acknowledged (a reviewer's cluster committed a record sent
        as two of three brokers died, when it took the first out of the in-sync
        replicas, while refusing every new one), which ended it, and readiness flapped.
        Until then it holds for STALLED_FOR_SECONDS after the last timeout that finds
        Kafka taking nothing, or the last delivery refused at once as Kafka answered
        nothing at all (which takes the place of timeouts in an outage: without it the
        stall lapsed and /readyz said 200 as metadata came back before the quorum). It
        needs records to tell, and without traffic there is nothing to renew it, so
        once a load balancer has stopped sending, the bridge is ready again that much
        later, and the traffic that comes back probes Kafka again. An answer to a
        record published before the stall cuts what is left of the hold to two publish
        timeouts (STALLED_FOR_SECONDS after a routine failover at low traffic left a
        lone bridge out of rotation for 20 s after Kafka recovered): enough for the
        records published since to time out, and renew it, if Kafka still takes none.

        A topic whose metadata never comes (a missing one) times out before its
        hand-over, and does not count: that is the trouble of one topic, not of Kafka.
        """
        return self._stall_began is not None and time.perf_counter() < self._stalled_until

    def _stall(self) -> None:
        """A publish timed out with Kafka answering no record since it began."""
        now = time.perf_counter()
        if self._stall_began is None:  # said once, however often it holds again
            self._stall_began = now
            log.warning(
                "Kafka at %s took no record within %g s (unreachable, fewer in-sync "
                "replicas than min.insync.replicas, or partitions without a leader?); in "
                "broker mode /readyz is 503 until it takes one published since, or for "
                "%g s after the last such timeout",
                self._settings.kafka_bootstrap,
                self._timeout,
                STALLED_FOR_SECONDS,
            )
        self._stalled_until = now + STALLED_FOR_SECONDS

    @property
    def clock_refused(self) -> bool:
        """Kafka refuses the records' timestamps (INVALID_TIMESTAMP) and has taken no
        record for CLOCK_REFUSED_FOR_SECONDS: the bridge host's clock is off (what makes
        a broker-mode bridge unready). Every request got a 503 while /readyz said 200,
        so a load balancer kept the one replica with a wrong clock in rotation.

        Records landing meanwhile, whoever handed them over (a topic of its own with
        a tight message.timestamp.*.max.ms refusing them, the others taking theirs)
        are the trouble of that topic, not the clock's: no unreadiness then. Only the
        deliveries' refusals count (publish, broker mode): a leftover spool's drainer
        retrying a held topic renewed it for good. Without traffic it lapses after
        CLOCK_REFUSED_FOR_SECONDS, and the traffic that comes back tries the clock
        again."""
        now = time.perf_counter()
        return (
            now - self._clock_refused_at < CLOCK_REFUSED_FOR_SECONDS
            and now - self._landed_at >= CLOCK_REFUSED_FOR_SECONDS
        )

    def _refused_clock(self) -> PublishFailed:
        """Kafka refused a record's timestamp (CreateTime, the bridge host's clock)."""
        now = time.perf_counter()
        if now - self._clock_said >= CLOCK_SAID_EVERY_SECONDS:
            self._clock_said = now
            log.error(
                "Kafka refuses the records' timestamps (InvalidTimestampError): the bridge "
                "host's clock is more than the topics' message.timestamp.after.max.ms (1 "
                "hour by default in Kafka 4) ahead of the brokers', or message.timestamp."
                "before.max.ms behind; synchronise it (NTP). The records wait (durable, "
                "memory) or are answered 503 (broker mode, unready once none lands for "
                "%g s); said at most every %g s",
                CLOCK_REFUSED_FOR_SECONDS,
                CLOCK_SAID_EVERY_SECONDS,
            )
        # Not the clocks' values: the answer goes to the sender (the log says the rest).
        return PublishFailed(
            "Kafka refused the record's timestamp (InvalidTimestampError): the bridge's "
            "clock differs from Kafka's"
        )

    def _taken(self, started: float) -> None:
        """Kafka acknowledged a record whose publish began at ``started``."""
        if self._stall_began is not None and started > self._stall_began:
            self._stall_began = None
            log.info("Kafka takes records again: a stall is over")

    def answered_since(self, since: float) -> bool:
        """Whether Kafka answered after ``since`` (time.perf_counter): acknowledged or
        refused a record, or answered a metadata request (the heartbeat's, or the
        producer's own for a topic it has no metadata for, unknown topics included):
        trouble with one topic then, not Kafka away, which ``connected`` tells only once
        the metadata is STALE_AFTER_SECONDS old."""
        if self._answered_at > since:
            return True
        return self._producer is not None and self._metadata_age() < time.perf_counter() - since

    def _answered(self) -> None:
        self._answered_until = time.monotonic() + UNANSWERED_AFTER_SECONDS
        self._answered_at = time.perf_counter()

    async def start(self) -> None:
        """Connect once, waiting at most ``kafka_connect_timeout``; keep trying in the
        background if Kafka is not there yet (the bridge answers 503 meanwhile)."""
        quiet_aiokafka_sender_end(asyncio.get_running_loop())
        if not await self._connect(at_startup=True) and self.denied is None:  # else said
            log.warning(
                "Kafka at %s is not reachable yet; retrying in the background",
                self._settings.kafka_bootstrap,
            )
        self._tasks.append(spawn(self._keep_connected(), "kafka-keep-connected"))

    async def _connect(self, *, at_startup: bool = False) -> bool:
        """Start a producer and use it. Kafka refusing the credentials or TLS settings
        raises ConfigError ``at_startup`` (the bridge cannot work until they are
        fixed); later (Kafka was not reachable at startup, say) it is logged at ERROR,
        at most every EXPLAIN_SECONDS, and retried like an outage. Without that, a
        refusal after an unreachable start was retried for ever without a word."""
        explain = not at_startup and time.monotonic() >= self._explain_not_before
        started = await self._start_producer(at_startup=at_startup, explain=explain)
        if isinstance(started, str):
            # This try's: a denial followed by an outage was still said as a denial.
            # (Not a rotation's or a reset's: their producer is not the bridge's yet.)
            self.denied = self._denial
            return False
        self._use(*started)
        log.info("connected to Kafka at %s", self._settings.kafka_bootstrap)
        return True

    async def _start_producer(
        self, *, at_startup: bool = False, explain: bool = False
    ) -> tuple[AIOKafkaProducer, bytes] | str:
        """A started producer and the fingerprint of the secrets it was made with, or
        why there is none: REFUSED (the secret files cannot be used, or, when
        ``explain``, Kafka refused them) or FAILED (anything else: unreachable, slow).
        Why Kafka refused the secrets is raised ``at_startup`` and logged if
        ``explain`` (finding out takes a connection of its own)."""
        fingerprint = secrets_fingerprint(self._settings)
        self._denial = None
        try:
            options = kafka_client_options(self._settings)
        except ConfigError as exc:
            if at_startup:
                raise
            log.error("cannot connect to Kafka: %s", exc)
            return REFUSED
        producer = AIOKafkaProducer(
            **options,
            acks="all",
            enable_idempotence=True,
            partitioner=KeyPartitioner(),
            linger_ms=self._settings.kafka_linger_ms,
            compression_type=None
            if self._settings.kafka_compression == "none"
            else self._settings.kafka_compression,
            max_request_size=self._max_request_size,
        )
        try:
            async with asyncio.timeout(self._settings.kafka_connect_timeout):
                await producer.start()
        except asyncio.CancelledError:  # shutting down: close what it opened so far
            await self._abandon(producer)
            raise
        except (KafkaError, OSError, TimeoutError) as exc:
            log.debug("connecting to Kafka failed: %r", exc)
            await self._abandon(producer)
            if isinstance(exc, ClusterAuthorizationFailedError | TopicAuthorizationFailedError):
                # Kafka answered, and refused: "not reachable yet" sent the operator
                # after the network (a review's ACL for the wrong principal). Not fatal
                # at startup as refused credentials are: an ACL is granted on Kafka,
                # without a restart, and the other modes take events meanwhile.
                self._denial = _denial(self._settings, exc)
                if at_startup or explain:
                    self._explain_not_before = time.monotonic() + EXPLAIN_SECONDS
                    log.error("%s; trying again in the background", self._denial)
                return REFUSED
            if (at_startup or explain) and not isinstance(exc, TimeoutError):
                # asked now (at startup too): background tries ask again EXPLAIN_SECONDS on
                self._explain_not_before = time.monotonic() + EXPLAIN_SECONDS
                try:
                    refusal, hint = await kafka_diagnosis(self._settings, options)
                except Exception as unforeseen:  # SCRAM's ValueError, say: no reason known
                    log.debug("asking Kafka why failed: %r", unforeseen)
                    refusal = hint = None
                if refusal is not None:
                    if at_startup:
                        raise ConfigError(refusal) from None
                    log.error("%s", refusal)
                    return REFUSED
                if hint is not None:
                    log.warning("%s", hint)
            return FAILED
        except Exception as exc:  # not foreseen: aiokafka's SCRAM raises ValueError, say
            # Closed, not leaked, and a failure like any other: raised, it ended the task
            # that keeps the bridge connected, which then never connected again.
            await self._abandon(producer)
            log.error("connecting to Kafka failed: %r", exc)
            return FAILED
        return producer, fingerprint

    async def _abandon(self, producer: AIOKafkaProducer) -> None:
        """Close a producer that never fully started (it holds no records)."""
        with contextlib.suppress(Exception):  # best effort
            async with asyncio.timeout(self._settings.kafka_connect_timeout):
                await producer.stop()

    def _use(self, producer: AIOKafkaProducer, fingerprint: bytes) -> None:
        self.denied = None
        self._announce_replacement()
        self._replaced = asyncio.get_running_loop().create_future()
        self._handover = DirectHandover(producer, self._max_request_size)
        self._producer = producer
        if (sender := getattr(producer, "_sender", None)) is not None:
            sender.on_throttle = self._on_throttle  # called by bridge.kafkafixes' mend
        self._watch = functools.partial(self._after_ack, producer)
        self._fingerprint = fingerprint
        self._refreshed()  # a producer starts with the cluster's metadata
        self._answered()
        self._metadata_before, self._metadata_at = -math.inf, time.monotonic()
        # A weak reference: a strong one made a cycle (producer, its cluster view, this
        # listener), which kept a replaced producer until the cyclic collector came by,
        # and the first one (frozen with the startup's objects: gc.freeze) for good.
        came = functools.partial(self._metadata_came, weakref.ref(producer))
        producer.client.cluster.add_listener(came)

    def _metadata_came(
        self, producer: weakref.ReferenceType[AIOKafkaProducer], _cluster: object
    ) -> None:
        """aiokafka completed a metadata refresh of ``producer``'s (a listener of its
        cluster view, called for successful ones only)."""
        if (current := self._producer) is not None and producer() is current:
            self._metadata_before, self._metadata_at = self._metadata_at, time.monotonic()

    def _metadata_age(self) -> float:
        """Seconds since the producer in use last got a metadata response. Timed here, on
        the monotonic clock: aiokafka stamps its own on the wall clock, which an NTP step
        moves (one an hour back kept a Kafka that answered nothing connected, and ready,
        for that hour)."""
        return time.monotonic() - self._metadata_at

    async def _keep_connected(self) -> None:
        backoff = 0.5
        while True:
            try:
                if self._producer is None:
                    if await self._connect():
                        backoff = 0.5
                    else:
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 10.0)
                    continue
                await asyncio.sleep(HEARTBEAT_SECONDS)
                self._check_secrets()
                self._reset_soon()  # one that had to wait (a failed try, too soon after the last)
                await self._heartbeat(self._producer)
                backoff = 0.5
            except Exception:  # a bug: this task must outlive it, or Kafka is never seen again
                log.exception("keeping the Kafka connection failed; trying again")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def _check_secrets(self) -> None:
        """Start using rotated secret files (password, certificates) without a restart.

        Connections aiokafka already has stay open on the old secrets, but any new
        one (after a broker restart, say) would use them too, and fail once Kafka
        stops accepting them. So when the files change, a new producer connects
        with what they hold now and takes over; the old one finishes what it was
        sending, then closes. While connecting with the new files fails (Kafka refuses
        them, or does not answer), the old producer stays in use and the files are
        tried again, less and less often.
        """
        if self._rotation is not None:
            return
        current = secrets_fingerprint(self._settings)
        if current == self._fingerprint:
            return
        if current == self._failed_fingerprint and time.monotonic() < self._rotation_not_before:
            return  # failed just now; files changed again are tried at once
        self._rotation = spawn(self._rotate(current), "kafka-rotate-secrets")

    async def _rotate(self, fingerprint: bytes) -> None:
        failed = False
        try:
            log.info("the Kafka secret files changed: connecting with them")
            try:
                started = await self._start_producer(explain=True)
            except Exception as exc:  # not foreseen: the producer's constructor refusing
                # an option, say (_start_producer itself catches what starting raises)
                log.error("connecting with the changed secret files failed: %r", exc)
                started = FAILED  # tried again after the back-off, like any failure
            if isinstance(started, str):
                failed = True
                self._metrics.secret_rotations.labels(started).inc()
                if fingerprint != self._failed_fingerprint:
                    self._failed_fingerprint, self._rotation_backoff = fingerprint, 0.0
                self._rotation_backoff = min(
                    self._rotation_backoff * 2 or HEARTBEAT_SECONDS, ROTATION_RETRY_MAX_SECONDS
                )
                self._rotation_not_before = time.monotonic() + self._rotation_backoff
                log.error(
                    "could not connect to Kafka with the changed secret files; still using "
                    "the connection made before they changed; trying again in %g s",
                    self._rotation_backoff,
                )
                return
            self._replace(*started)
            self._rotation_backoff = 0.0
            self._metrics.secret_rotations.labels("applied").inc()
            log.info("connected to Kafka with the changed secret files")
        finally:
            if self._rotation is asyncio.current_task():
                self._rotation = None
            if failed:
                # A producer broken while this rotation was connecting was left to it
                # (_reset_soon): it is replaced now, not at the next heartbeat (up to
                # 5 s of 503s for its partition meanwhile); the reset is the task in
                # _rotation then, which stop() cancels. Not when this rotation was
                # cancelled: stop() did that, and a reset would outlive it.
                self._reset_soon()

    def _announce_replacement(self) -> None:
        """Tell the sends waiting on the producer in use that it is gone."""
        if self._replaced is not None and not self._replaced.done():
            self._replaced.set_result(None)

    def _replace(self, producer: AIOKafkaProducer, fingerprint: bytes) -> None:
        """Send new records through ``producer``; the one it replaces finishes what it
        holds in the background, then closes."""
        old, old_handover = self._producer, self._handover
        self._use(producer, fingerprint)
        # Whatever replaced it (a reset, a rotation), a broken producer is gone: the
        # next one broken starts its tries afresh, the first failure said again.
        self._reset_backoff = 0.0
        if old_handover is not None:
            old_handover.close()
        if old is not None:
            # A task of its own, so that stop() can cancel a rotation that is still
            # connecting without cutting short a flush, and flush the old producer
            # and the current one at the same time.
            retiring = spawn(self._retire(old), "kafka-retire-producer")
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)

    def _after_ack(self, producer: AIOKafkaProducer, acked: asyncio.Future[Any]) -> None:
        """Notice Kafka's answers (an acknowledgement, a refusal), and a record of
        ``producer`` that Kafka refused or the producer gave up on.

        aiokafka 0.14's idempotent producer numbers each batch of a partition when it
        sends it and never takes the numbers of a refused batch back (issue 1017), so
        after one refusal (a batch over the topic's max.message.bytes, say) Kafka
        answers every later batch of that partition OutOfOrderSequenceNumber, which
        aiokafka does not retry: the partition is stuck while this producer lives.
        A fresh producer gets a new producer id, whose numbering starts over. Only
        the current producer's failures count: a replaced one's are its past.
        """
        if acked.cancelled():
            return
        failure = acked.exception()
        refused = failure is not None and refused_by_kafka(failure)
        if failure is None or refused:  # an answer: Kafka is there (see publish)
            if failure is None:  # taken, whoever handed it over (see clock_refused)
                self._landed_at = time.perf_counter()
            self._answered()
            self._record_answered_at = self._answered_at
            if self._stall_began is not None:  # see stalled
                self._stalled_until = min(
                    self._stalled_until, self._answered_at + 2 * self._timeout
                )
            if failure is None:
                return
        if producer is not self._producer or self._broken is producer:
            return
        self._broken = producer
        self._broken_by_clock = isinstance(failure, InvalidTimestampError)
        if isinstance(failure, OutOfOrderSequenceNumber):
            log.warning(
                "Kafka refused a record as out of order (%r): the producer's numbering of "
                "that partition broke (a batch refused or given up on before, during an "
                "outage say), so a fresh one replaces it",
                failure,
            )
        elif not refused:
            # Kafka away (or a partition without a leader) long enough for aiokafka to
            # give up on a batch: the numbering may have moved on without it as well.
            log.warning(
                "Kafka did not take a record (%r: unreachable, or the partition has no "
                "leader); the producer may not be able to send to that partition any "
                "more, so a fresh one replaces it once Kafka answers",
                failure,
            )
        else:
            log.log(
                # a clock Kafka refuses is said apart (once a minute): this came each
                # time the producer was replaced, about once a second (a review)
                logging.DEBUG if isinstance(failure, InvalidTimestampError) else logging.WARNING,
                "Kafka refused a record for good (%r); the producer cannot send to that "
                "partition any more, so a fresh one replaces it",
                failure,
            )
        self._reset_soon()

    def _reset_soon(self) -> None:
        """Start replacing the current producer if it is broken and nothing else is
        replacing it already (a secret rotation replaces it too)."""
        if self._rotation is not None or self._broken is None:
            return
        if self._broken is not self._producer:
            self._broken = None  # replaced meanwhile
            return
        wait = self._reset_not_before - time.monotonic()
        if wait > 0:
            # Not now (just after the last reset, or a failed try): then, not at the
            # next heartbeat, up to HEARTBEAT_SECONDS later, while broker-mode
            # requests for the stuck partition wait for it (_resend_when_replaced).
            self._reset_later(wait)
            return
        self._rotation = spawn(self._reset(), "kafka-reset-producer")

    def _reset_later(self, delay: float) -> None:
        """Look at the broken producer again in ``delay`` seconds (once)."""
        if self._reset_timer is None:
            self._reset_timer = asyncio.get_running_loop().call_later(delay, self._reset_due)

    def _reset_due(self) -> None:
        self._reset_timer = None
        self._reset_soon()

    async def _reset(self) -> None:
        try:
            started = await self._start_producer()
            if isinstance(started, str):
                # Kafka away, usually: said once (the heartbeat's lines follow the outage)
                log.log(
                    logging.DEBUG if self._reset_backoff else logging.WARNING,
                    "could not connect a fresh Kafka producer to replace the one that cannot "
                    "send to a partition any more; trying again every few seconds",
                )
                self._reset_backoff = min(self._reset_backoff * 2 or 0.5, RESET_RETRY_MAX_SECONDS)
                self._reset_not_before = time.monotonic() + self._reset_backoff
                self._reset_later(self._reset_backoff)  # the next try, once its back-off ends
                return
            self._replace(*started)  # (which clears the back-off)
            self._reset_not_before = time.monotonic() + RESET_MIN_INTERVAL_SECONDS
            self._metrics.producer_resets.inc()
            log.log(
                logging.DEBUG if self._broken_by_clock else logging.INFO,  # said apart
                "a fresh Kafka producer replaced the one that could no longer send",
            )
        finally:
            self._rotation = None

    async def _retire(self, producer: AIOKafkaProducer) -> None:
        """Close a replaced producer once it delivered what it holds (its records'
        senders are waiting for their acknowledgements). Runs in the background, so
        a failure is logged here or nowhere."""
        try:
            await self._flush_and_close(producer, "replaced")
        except Exception:
            log.exception("closing the replaced Kafka producer failed")

    async def _flush_and_close(
        self, producer: AIOKafkaProducer, which: str, deadline: float | None = None
    ) -> None:
        """Let ``producer`` deliver what it holds until ``deadline`` (monotonic; else
        within ``shutdown_timeout``), then close."""
        allowed = self._settings.shutdown_timeout
        if deadline is not None:
            allowed = max(0.0, deadline - time.monotonic())
        started = time.monotonic()
        try:
            async with asyncio.timeout(allowed) as flush:
                self._flushes.add(flush)
                try:
                    await producer.stop()
                finally:
                    self._flushes.discard(flush)
            return
        except TimeoutError:
            undelivered = _records_undelivered(producer)
            if undelivered:  # 0 when only its close was cut short: no ERROR then
                log.error(
                    "the %s Kafka producer did not deliver %s within %.1f s%s; they failed "
                    "(answered 503 in broker mode, for the sender to retry; %s; not "
                    "published by a replay)",
                    which,
                    "its records" if undelivered < 0 else f"{undelivered} record(s)",
                    time.monotonic() - started,  # stop() may have cut a replaced one's short
                    " (the stop's deadline was spent before its flush)" if not allowed else "",
                    # At shutdown memory mode's queue goes with the process.
                    "sent again by the drainer in the other modes"
                    if which == "replaced"
                    else "kept for the next start if a spool held them, lost if memory "
                    "mode's queue did",
                )
        await self._force_close(producer)

    async def _force_close(self, producer: AIOKafkaProducer) -> None:
        """Close a producer whose stop() was cut short.

        aiokafka 0.14's stop() marks the producer closed before it waits for the
        flush, so a second stop() returns at once: without this the sender task
        kept retrying, the connections stayed open (one producer leaked per rotation
        during an outage), and the acknowledgements of the records it held never
        came. Failing them first tells their senders now that those records were
        not delivered (the drainer sends them again through the current producer;
        one may still have landed, hence at least once).
        """
        undelivered = KafkaTimeoutError("the producer was closed before Kafka acknowledged")
        try:  # best effort: nothing below waits for Kafka
            accumulator = producer._message_accumulator
            accumulator.fail_all(undelivered)
            # The sender awaited each batch's drain waiter; it is gone, so the loop
            # would log each failed one at ERROR ("Future exception was never
            # retrieved") at every shutdown during an outage.
            queued = itertools.chain(*accumulator._batches.values())
            for batch in itertools.chain(queued, accumulator._pending_batches):
                waiter = batch._drain_waiter
                if waiter.done() and not waiter.cancelled():
                    waiter.exception()
        except Exception as exc:  # aiokafka's internals changed shape
            # Said, not hidden: the records it held are told nothing until their
            # senders' deadlines (the drainer's stay in the backlog till a restart).
            log.warning("could not fail the records of a closed Kafka producer: %r", exc)
        # One deadline for the client's close and the sender's end: one each made the
        # forced close 2 s where the grace periods count 1 (a review's test).
        deadline = time.monotonic() + FORCE_CLOSE_SECONDS
        with contextlib.suppress(Exception):
            async with asyncio.timeout(FORCE_CLOSE_SECONDS):
                await producer.client.close()
        sender = getattr(getattr(producer, "_sender", None), "sender_task", None)
        # Cancelled, the sender awaits its requests in flight, which may wait for
        # metadata that the closed client never brings; each cancel() also cancels
        # what the task awaits, so repeat until it ends.
        while sender is not None and not sender.done() and time.monotonic() < deadline:
            sender.cancel()
            await asyncio.wait([sender], timeout=0.05)
        if sender is not None and not sender.done():
            log.error("the Kafka producer's sender task did not end when cancelled")

    async def _heartbeat(self, producer: AIOKafkaProducer) -> None:
        """Refresh the producer's own view of the cluster, as proof that Kafka answers.

        Its own view, the metadata of the topics it sends to: aiokafka's
        fetch_all_metadata() fetched every topic of the cluster into a copy it then
        dropped, so the producer kept the leaders it knew (for 5 minutes, or until a
        request to one failed) while the bridge counted the metadata as fresh. A
        refresh still running when the next heartbeat comes (a broker that does not
        answer, waited for up to BRIDGE_KAFKA_REQUEST_TIMEOUT) is waited for, not
        started again.
        """
        try:
            async with asyncio.timeout(HEARTBEAT_SECONDS):
                if not await producer.client.force_metadata_update():
                    raise KafkaError("Unable to get cluster metadata over all known brokers")
        except (KafkaError, OSError, TimeoutError) as exc:
            self._refresh_failed(exc)
        else:
            self._refreshed()
            self._answered()
            if self._reset_backoff and self._broken is producer:
                # Kafka is back while a replacement waits out the back-off of its failed
                # tries: now, not up to RESET_RETRY_MAX_SECONDS later (its partitions
                # are stuck meanwhile).
                self._reset_not_before = 0.0
                self._reset_soon()

    def _refreshed(self) -> None:
        """Kafka gave the producer in use fresh metadata: a heartbeat, or its start."""
        now = time.monotonic()
        if self._refresh_failing:
            log.log(
                logging.INFO if self._refresh_run_said else logging.DEBUG,
                "Kafka answers metadata requests again, after %.0f s without an answer",
                now - self._refreshed_at,
            )
            self._refresh_failing = self._refresh_run_said = False
        self._refreshed_at = now

    def _refresh_failed(self, exc: BaseException) -> None:
        """Log a failed heartbeat: at WARNING at most once every
        REFRESH_FAILED_REPEAT_SECONDS, the first of a run of failures if none was said
        within that time (a line every HEARTBEAT_SECONDS all through an outage said
        nothing new, and a Kafka failing every other refresh got a warning and an "again"
        line for each); the rest at DEBUG."""
        now = time.monotonic()
        if self.throttled:  # it waited behind the throttle: Kafka answers (see connected)
            log.debug("Kafka metadata refresh failed while Kafka throttles: %r", exc)
            return
        first, self._refresh_failing = not self._refresh_failing, True
        # A run long enough for Kafka to count as away (bridge_kafka_connected 0) is
        # said once whenever it begins: a second outage within the minute of the last
        # warning left no line at all, not even its end (a review's flapping broker).
        away_unsaid = not self._refresh_run_said and now - self._refreshed_at >= STALE_AFTER_SECONDS
        if now - self._refresh_failure_said < REFRESH_FAILED_REPEAT_SECONDS and not away_unsaid:
            log.debug("Kafka metadata refresh failed: %r", exc)
            return
        self._refresh_failure_said, self._refresh_run_said = now, True
        if first:
            log.warning(
                "Kafka metadata refresh failed: %r; tried every %g s, said at most every "
                "%g s while it fails",
                exc,
                HEARTBEAT_SECONDS,
                REFRESH_FAILED_REPEAT_SECONDS,
            )
        else:
            log.warning(
                "Kafka has answered no metadata refresh for %.0f s: %r",
                now - self._refreshed_at,
                exc,
            )

    def metadata_lacks(self, topic: str, since: float) -> bool:
        """Whether Kafka answered a metadata request asked after ``since``
        (perf_counter) and the producer still knows no partition of ``topic``: the
        topic is missing (or denied), not waiting behind a throttle, which delays
        metadata answers as much as the rest (Kafka mutes the throttled connection:
        KIP-219). aiokafka asks for metadata one request at a time, so of two answers
        after ``since`` the second was asked after it, for ``topic`` too: the first
        may be of a request sent before, without it (a review's test)."""
        since_answered = time.monotonic() - self._metadata_before
        return since_answered < time.perf_counter() - since and not self.ready_for(topic)

    def ready_for(self, topic: str) -> bool:
        """True when the producer knows ``topic``'s partitions: a hand-over to it need
        not wait for metadata."""
        producer = self._producer
        if producer is None:
            return False
        if self._handover is not None and self._handover.knows(topic):
            return True  # a dict look-up, where aiokafka's would build a set
        return bool(producer.client.cluster.partitions_for_topic(topic))

    async def hand_over(self, destination: Destination) -> asyncio.Future[Any]:
        """Hand a record to the producer; the returned future resolves on Kafka's ack.

        Has no deadline of its own (it may wait for metadata or buffer space): the
        caller bounds it, once for all it does. Raises a BridgeError when the record
        cannot be handed over. Cancelling this call withdraws the record; once it
        returned, the record may land even if the caller stops waiting, which is why
        consumers get the idempotency key as message key.
        """
        producer, watch = self._producer, self._watch
        if producer is None or watch is None:
            self._metrics.record_publish_error("not_connected")
            raise Unavailable("not connected to Kafka yet")
        try:
            acked: asyncio.Future[Any] | None = None
            if self._handover is not None:
                acked = self._handover.append(
                    destination.topic, destination.key, destination.value, destination.headers
                )
            if acked is None:
                acked, watch = await self._send_through(producer, watch, destination)
                if self._handover is not None:
                    # Found now, before anything else runs (see publish).
                    self._handover.last_batch = self._handover.batch_of_send(
                        destination.topic, destination.key, acked
                    )
        except Exception as exc:
            raise self.failure(exc) from None
        acked.add_done_callback(watch)
        return acked

    async def _send_through(
        self,
        producer: AIOKafkaProducer,
        watch: Callable[[asyncio.Future[Any]], None],
        destination: Destination,
    ) -> tuple[asyncio.Future[Any], Callable[[asyncio.Future[Any]], None]]:
        """``producer.send()`` (which may wait for the topic's metadata or for buffer
        space), moved to the producer that replaces ``producer`` while it waits; the
        acknowledgement future and the watch (``watch`` is ``producer``'s) of the
        producer that took the record.

        A replaced producer flushes and closes, and its client then never brings the
        metadata a send is waiting for: that send waited until its caller's deadline.
        This was the dead letter of a record Kafka refused, whose refusal replaces the
        producer, for a dead-letter topic Kafka creates on first use: a 503.
        """
        while True:
            replaced = self._replaced
            if replaced is None:  # not reached: made with the producer
                raise Unavailable("not connected to Kafka yet")
            try:
                with _cancelled_when(replaced) as moved:
                    acked: asyncio.Future[Any] = await producer.send(
                        destination.topic,
                        value=destination.value,
                        key=destination.key,
                        headers=destination.headers,
                    )
                return acked, watch
            except asyncio.CancelledError:
                if not moved():
                    raise  # the caller's own cancellation (its deadline, say)
            # Cancelled at an await: aiokafka's send() appends the record after its
            # last one, so the replaced producer never took it. Now the new one.
            current, current_watch = self._producer, self._watch
            if current is None or current_watch is None:
                self._metrics.record_publish_error("not_connected")
                raise Unavailable("the Kafka producer stopped")
            producer, watch = current, current_watch

    async def send(self, destination: Destination) -> asyncio.Future[Any]:
        """:meth:`hand_over` within ``publish_timeout``."""
        try:
            async with asyncio.timeout(self._timeout):
                return await self.hand_over(destination)
        except TimeoutError:
            self._metrics.record_publish_error("timeout")
            raise PublishTimeout(
                f"Kafka took more than {self._timeout:g} s to take a record for "
                f"{destination.topic} (metadata or buffer space)"
            ) from None

    def failure(self, exc: BaseException) -> BridgeError:
        """The BridgeError for an exception from the producer (and count it)."""
        if isinstance(exc, BridgeError):
            return exc
        if isinstance(exc, TOO_LARGE_FOR_KAFKA):
            self._metrics.record_publish_error("too_large")
            return PayloadTooLarge(
                "the record is larger than Kafka accepts (check the topic's max.message.bytes "
                "and segment.bytes)"
            )
        if isinstance(exc, KafkaTimeoutError):
            # No refusal: a wait that ran out (send()'s, for room in the queue of a
            # partition that takes nothing); said as a refusal ("Kafka refused the
            # record"), it sent the operator after the record instead of the partition.
            self._metrics.record_publish_error("timeout")
            return PublishTimeout(f"Kafka did not take the record in time ({exc})")
        self._metrics.record_publish_error("kafka_error")
        if isinstance(exc, KafkaError):
            return self._refused(exc)
        log.error("unexpected error from the Kafka producer", exc_info=exc)
        return PublishFailed(f"the Kafka client failed: {type(exc).__name__}")

    def _refused(self, exc: KafkaError) -> PublishFailed:
        """What Kafka refusing a record means, said as what to mend where it can be."""
        if isinstance(exc, InvalidTimestampError):
            return self._refused_clock()
        if isinstance(exc, TopicAuthorizationFailedError):  # said as what to grant
            return PublishFailed(
                "Kafka denies the bridge WRITE or DESCRIBE on the record's topic "
                "(TopicAuthorizationFailedError)"
            )
        return PublishFailed(f"Kafka refused the record: {type(exc).__name__}")

    def refuse_at_once(self) -> None:
        """Raise Unavailable while Kafka has answered nothing for UNANSWERED_AFTER_SECONDS
        (the bridge is unready by then), or before the first connection: a record would
        wait the whole publish timeout for the same 503, each such request holding one
        of BRIDGE_MAX_CONCURRENCY places. Kafka's answer to a metadata refresh
        aiokafka completed counts, as it does for ``connected``: a heartbeat that drew
        a hung broker first gave up before it came (refused at once, while ready)."""
        producer = self._producer
        if producer is None or (
            time.monotonic() >= self._answered_until
            and self._metadata_age() >= UNANSWERED_AFTER_SECONDS
        ):
            self._metrics.record_publish_error("not_connected")
            if self._stall_began is not None:  # Kafka takes nothing still: see stalled
                self._stall()
            raise Unavailable(
                ("not connected to Kafka yet" if self.denied is None else DENIED_ANSWER)
                if producer is None
                # The bridge's connections had no answer: Kafka may be answering other
                # clients (a broker stopped holds the requests queued behind its own).
                # Not where Kafka is: the answer goes to the sender, and the hosts are
                # the operator's to know (the log names them).
                else f"no answer from Kafka for {UNANSWERED_AFTER_SECONDS:g} s or more"
            )

    async def publish(self, destination: Destination) -> None:
        """Return once Kafka acknowledged the record (acks=all), or raise a BridgeError;
        at once Unavailable when :meth:`refuse_at_once` says so."""
        self.refuse_at_once()
        started = time.perf_counter()
        batch: Any = None
        watch = None
        acked: asyncio.Future[Any] | None = None
        handed_over = False
        try:
            async with self._deadlines.bound():  # one deadline for hand-over and ack
                replaced = self._replaced
                acked = await self.hand_over(destination)
                handed_over = True
                # The batch the record joined (found before anything else ran: see
                # hand_over; None if it could not be told), and the watch of the
                # producer that took it.
                batch = self._handover.last_batch if self._handover is not None else None
                watch = self._watch
                while True:
                    try:
                        # Not shielded: this record's future is nobody else's, and
                        # aiokafka skips a cancelled one when the batch completes.
                        await acked
                        break
                    except (OutOfOrderSequenceNumber, *BATCH_TOO_LARGE) as exc:
                        if isinstance(exc, BATCH_TOO_LARGE) and _alone(batch):
                            raise  # its own size: too large for good
                        # Refused with its batch: as out of order (another batch of
                        # the partition was refused before it), or as too large, which
                        # the record may only have shared with others (concurrent small
                        # events got 413s: 1,117 of 1,129 on a 4,000-byte topic). Once
                        # the producer that refusal breaks is replaced, it goes again
                        # in a batch of its own, as the drainer's records do: a shared
                        # batch could be refused again, and this one is its own
                        # verdict. Within the deadline, as often as it takes.
                        await self._resend_when_replaced(replaced, exc)
                        replaced = self._replaced
                        acked, batch = await self._hand_over_alone(destination)
        except TimeoutError:
            # The deadline cancelled the record's own future; its batch's future (of
            # every batch the record may be in: see hand_over) tells what became of it.
            landing = getattr(batch, "future", None)
            if not isinstance(landing, asyncio.Future):
                landing = None
            if (landing is not None and landed(landing)) or (acked is not None and landed(acked)):
                # Kafka's acknowledgement came in the loop's turn the deadline fired
                # in: the record is in Kafka, and a 503 would have its retry sent again.
                self._published(destination, started)
                return
            self._keep_watching(batch, watch)
            if handed_over and self._record_answered_at < started and self._broker_mode:
                self._stall()
            self._metrics.record_publish_error("timeout")
            raise self._timed_out(destination, started, landing) from None
        except Exception as exc:
            if isinstance(exc, InvalidTimestampError) and self._broker_mode:
                # a delivery's own (see clock_refused): not the drainer's retries of a
                # leftover spool's held topic, which kept the bridge unready for good
                self._clock_refused_at = time.perf_counter()
            raise self.failure(exc) from None
        finally:
            # A refusal's traceback holds this frame: holding the future the refusal
            # came from, the frame kept itself, and the frames above with the
            # delivery's body, until the cyclic collector ran (so is the refusal built
            # elsewhere, not held in a name here). The batch too: aiokafka's holds
            # the future of each of its records.
            acked = batch = None
        self._published(destination, started)

    def _timed_out(
        self, destination: Destination, started: float, landing: asyncio.Future[Any] | None
    ) -> PublishTimeout:
        timeout = PublishTimeout(
            f"Kafka did not acknowledge the record for {destination.topic} "
            f"within {self._timeout:g} s"
        )
        if landing is not None:
            # It may land still: then its key is recorded (see BrokerAck) and it is
            # counted published, as Kafka has it. (Its size only: the body is not
            # kept for that, the producer's batch has its own copy.)
            timeout.landing = landing
            landing.add_done_callback(
                functools.partial(self._published_late, len(destination.value), started)
            )
        return timeout

    def _published(self, destination: Destination, started: float) -> None:
        self._landed_at = time.perf_counter()
        if self._stall_began is not None:
            self._taken(started)
        self._metrics.record_published(len(destination.value), time.perf_counter() - started)

    def _published_late(self, size: int, started: float, landing: asyncio.Future[Any]) -> None:
        if landed(landing):
            self._landed_at = time.perf_counter()
            self._metrics.record_published(size, time.perf_counter() - started)

    @staticmethod
    def _keep_watching(batch: Any, watch: Callable[[asyncio.Future[Any]], None] | None) -> None:
        """Watch the batch of a record whose request stopped waiting at its deadline.

        The deadline cancelled the record's own future, so the watch put on it saw
        nothing of what became of the batch. During an outage (its partition without a
        leader for BRIDGE_KAFKA_REQUEST_TIMEOUT) aiokafka gives up on that batch, which
        breaks the producer's numbering of the partition (see _after_ack): seen here,
        the producer is replaced as soon as Kafka answers again, as in the other modes
        (3 s after Kafka's return in a 60 s outage under load). Unseen, it was replaced
        only once Kafka refused a record as out of order after its return (4 s after it
        in the same test), the records of that partition waiting for the replacement
        meanwhile. Only a batch the hand-over could name (``batch``, else None).
        """
        future = getattr(batch, "future", None)
        if watch is None or not isinstance(future, asyncio.Future) or future.done():
            return
        # Once per batch, however many of its records timed out together.
        future.remove_done_callback(watch)
        future.add_done_callback(watch)

    async def _hand_over_alone(self, destination: Destination) -> tuple[asyncio.Future[Any], Any]:
        """Hand the record over in a batch of its own, to the partition its key gives
        (the partitioner's rule): a future that resolves on Kafka's ack of that batch,
        and the batch (aiokafka's MessageBatch, else a stand-in without a future)."""
        producer, watch = self._producer, self._watch
        if producer is None or watch is None:
            self._metrics.record_publish_error("not_connected")
            raise Unavailable("the Kafka producer stopped")
        partitions = sorted(await producer.partitions_for(destination.topic))
        batch = producer.create_batch()
        # An empty batch takes any record under max_request_size, which hand_over
        # checked already. Closed: records sent meanwhile open a batch of their own
        # rather than join this one, the last of its partition's.
        batch.append(
            timestamp=None,
            key=destination.key,
            value=destination.value,
            headers=destination.headers,
        )
        batch.close()
        partition = partition_for(destination.key, partitions)
        acked: asyncio.Future[Any] = await producer.send_batch(
            batch, destination.topic, partition=partition
        )
        acked.add_done_callback(watch)
        # A shield of the batch's future: the batch itself tells a timed-out caller
        # whether the record landed after all.
        handover = self._handover
        made = handover and handover.batch_of_send_batch(destination.topic, partition, batch)
        return acked, made or _ALONE

    async def _resend_when_replaced(
        self, replaced: asyncio.Future[None] | None, exc: KafkaError
    ) -> None:
        """Wait (within the caller's deadline) until the producer that refused a record
        (as out of order, or its batch as too large) is replaced, so that the record
        can go again.

        That producer cannot send to the partition any more (see _after_ack), and is
        being replaced. Kafka wrote nothing of a batch it refused this way, so sending
        the record again through the fresh producer makes no duplicate. Without this,
        every record for that partition in broker mode got a 503 until the
        replacement was made (a connection to Kafka: tens of milliseconds).
        """
        self.failure(exc)  # counted: the attempt failed
        if replaced is None or replaced.done():
            # Taken by a producer other than the one in use when it was handed over
            # (the hand-over moved to a replacement, see _send_through): wait for the
            # one in use now, if it is the broken one.
            replaced = self._replaced if self._broken is self._producer else None
        if replaced is not None:
            await asyncio.shield(replaced)  # shared by every waiter: not to be cancelled

    async def stop(self, deadline: float | None = None) -> None:
        """Flush what is in flight until ``deadline`` (monotonic; else within
        ``shutdown_timeout``), then close.

        A rotation still connecting is cancelled (its producer holds no records yet),
        and a replaced producer still flushing flushes alongside the current one, so
        that shutdown takes ``shutdown_timeout``, not that plus a rotation's timeouts.
        """
        if self._reset_timer is not None:
            self._reset_timer.cancel()
            self._reset_timer = None
        background = [*self._tasks, *([self._rotation] if self._rotation else [])]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        producer, self._producer = self._producer, None
        self._watch = self._broken = None
        self._announce_replacement()
        if self._handover is not None:
            self._handover.close()
            self._handover = None
        if deadline is not None:  # a replaced producer's flush ends with the current one's
            loop = asyncio.get_running_loop()
            until = loop.time() + max(0.0, deadline - time.monotonic())
            for flush in self._flushes:
                when = flush.when()
                if when is None or when > until:
                    flush.reschedule(until)
        current = (
            [self._flush_and_close(producer, "current", deadline)] if producer is not None else []
        )
        await asyncio.gather(*current, *self._retiring)  # _retire logs its own failures
