"""Kafka security: SASL (PLAIN, SCRAM) and TLS (custom CA, client certificates).

The broker tests share one module-scoped Kafka with a listener per case:
SASL_PLAINTEXT with SCRAM-SHA-512 and -256 (users created at format time),
SASL_SSL with PLAIN, SSL, and SSL requiring a client certificate, all with
certificates the test makes. The settings tests need no broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError
from starlette.testclient import TestClient

from bridge import publisher as publisher_module
from bridge.app import create_app
from bridge.cli import main
from bridge.config import Settings, load_settings
from bridge.devkafka import (
    Listener,
    LocalKafka,
    ensure_jars,
    find_java,
    free_port,
    free_ports,
)
from bridge.errors import ConfigError
from bridge.kafkaadmin import read_to_end, reader
from bridge.metrics import Metrics
from bridge.publisher import (
    KafkaPublisher,
    kafka_client_options,
    kafka_diagnosis,
    secrets_fingerprint,
)
from bridge.routing import Destination
from tests.conftest import REPO, thrown_away
from tests.fakes import TOKEN
from tests.polling import eventually
from tests.tlsfiles import CertificateAuthority, KeyPair, issue, make_ca

SCRAM_PASSWORD = "scram-Secret-1"
PLAIN_PASSWORD = "plain-Secret-2"
KEY_PASSWORD = "key-Secret-3"
WRONG_PASSWORD = "not-the-Password-9"
ROTATION_PASSWORDS = ("before-Rotation-4", "after-Rotation-5")
SCRAM_JAAS = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
PLAIN_JAAS = (
    "org.apache.kafka.common.security.plain.PlainLoginModule required "
    f'user_bridge="{PLAIN_PASSWORD}";'
)

broker_test = [pytest.mark.kafka, pytest.mark.slow]


@dataclass(frozen=True)
class TlsFiles:
    ca: CertificateAuthority
    other_ca: CertificateAuthority
    broker: KeyPair
    client: KeyPair  # signed by ``ca``, key encrypted with KEY_PASSWORD
    key_password_file: Path


@dataclass(frozen=True)
class SecureKafka:
    broker: LocalKafka
    tls: TlsFiles

    def bootstrap(self, listener: str) -> str:
        return self.broker.listener_bootstrap(listener)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA, a broker certificate for 127.0.0.1, a client certificate, and a stranger CA."""
    folder = tmp_path_factory.mktemp("tls")
    ca = make_ca(folder, "test-ca")
    password_file = folder / "client-key-password"
    password_file.write_text(KEY_PASSWORD + "\n")
    return TlsFiles(
        ca=ca,
        other_ca=make_ca(folder, "other-ca"),
        broker=issue(ca, folder, "broker", hosts=("127.0.0.1", "localhost")),
        client=issue(ca, folder, "bridge-client", password=KEY_PASSWORD),
        key_password_file=password_file,
    )


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[SecureKafka]:
    """One broker with PLAINTEXT, SCRAM, SASLSSL, TLS and MTLS listeners."""
    home = REPO / ".cache" / "kafka"
    ensure_jars(home)
    port, controller, scram, sasl_ssl, tls_port, mtls = free_ports(6)
    properties = {
        "listener.name.scram.sasl.enabled.mechanisms": "SCRAM-SHA-512,SCRAM-SHA-256",
        "listener.name.scram.scram-sha-512.sasl.jaas.config": SCRAM_JAAS,
        "listener.name.scram.scram-sha-256.sasl.jaas.config": SCRAM_JAAS,
        "listener.name.saslssl.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.saslssl.plain.sasl.jaas.config": PLAIN_JAAS,
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(tls.broker.bundle),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(tls.ca.cert),
        "listener.name.mtls.ssl.client.auth": "required",
    }
    users = [f"SCRAM-SHA-{bits}=[name=bridge,password={SCRAM_PASSWORD}]" for bits in (512, 256)]
    users.append(f"SCRAM-SHA-512=[name=rotator,password={ROTATION_PASSWORDS[0]}]")
    broker = LocalKafka(
        home,
        tmp_path_factory.mktemp("secure-kafka") / "data",
        port,
        controller,
        listeners=[
            Listener("SCRAM", scram, "SASL_PLAINTEXT"),
            Listener("SASLSSL", sasl_ssl, "SASL_SSL"),
            Listener("TLS", tls_port, "SSL"),
            Listener("MTLS", mtls, "SSL"),
        ],
        extra_properties=properties,
        format_args=[arg for user in users for arg in ("--add-scram", user)],
        die_with_parent=True,  # gone with a killed run
    )
    with broker, thrown_away(broker):
        yield SecureKafka(broker, tls)


def bridge_env(bootstrap: str, prefix: str, **security: str | Path) -> dict[str, str]:
    """Settings for an in-process bridge that answers once Kafka acknowledged."""
    return {
        "BRIDGE_TOKENS": TOKEN,
        "BRIDGE_ACK": "broker",
        "BRIDGE_SPOOL_DIR": os.environ["BRIDGE_SPOOL_DIR"],  # the test's own (conftest)
        "BRIDGE_KAFKA_BOOTSTRAP": bootstrap,
        "BRIDGE_KAFKA_CONNECT_TIMEOUT": "5",
        "BRIDGE_PUBLISH_TIMEOUT": "10",
        "BRIDGE_TOPIC_TEMPLATE": prefix + ".{entity}.{action}",
        "BRIDGE_DEADLETTER_TOPIC": "",
        **{f"BRIDGE_KAFKA_{name.upper()}": str(value) for name, value in security.items()},
    }


def scram(mechanism: str = "SCRAM-SHA-512", password: str = SCRAM_PASSWORD) -> dict[str, str]:
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_username": "bridge",
        "sasl_password": password,
    }


def case_env(kafka: SecureKafka, case: str, prefix: str, tmp_path: Path) -> dict[str, str]:
    tls = kafka.tls
    if case == "SASL_PLAINTEXT/SCRAM-SHA-512":
        return bridge_env(kafka.bootstrap("SCRAM"), prefix, **scram())
    if case == "SASL_PLAINTEXT/SCRAM-SHA-256, password file":
        secret = tmp_path / "kafka-password"
        secret.write_text(SCRAM_PASSWORD + "\n")
        security = scram("SCRAM-SHA-256")
        del security["sasl_password"]
        return bridge_env(kafka.bootstrap("SCRAM"), prefix, **security, sasl_password_file=secret)
    if case == "SASL_SSL/PLAIN":
        return bridge_env(
            kafka.bootstrap("SASLSSL"),
            prefix,
            security_protocol="SASL_SSL",
            sasl_mechanism="PLAIN",
            sasl_username="bridge",
            sasl_password=PLAIN_PASSWORD,
            ssl_cafile=tls.ca.cert,
        )
    if case == "SSL":
        return bridge_env(
            kafka.bootstrap("TLS"), prefix, security_protocol="SSL", ssl_cafile=tls.ca.cert
        )
    assert case == "SSL, client certificate with encrypted key"
    return bridge_env(
        kafka.bootstrap("MTLS"),
        prefix,
        security_protocol="SSL",
        ssl_cafile=tls.ca.cert,
        ssl_certfile=tls.client.cert,
        ssl_keyfile=tls.client.key,
        ssl_keyfile_password_file=tls.key_password_file,
    )


async def read_back_async(settings: Settings, prefix: str) -> list[Any]:
    """What is on the prefix's topics, read with the bridge's own connection options."""
    async with asyncio.timeout(30):
        return await read_to_end(kafka_client_options(settings), prefix=prefix)


def read_back(settings: Settings, prefix: str) -> list[Any]:
    return asyncio.run(read_back_async(settings, prefix))


def post_order(client: TestClient, key: str) -> int:
    return client.post(
        "/webhooks/geins/Order/create",
        content=b'{"id":"o-1"}',
        headers={"Authorization": f"Bearer {TOKEN}", "x-Idempotency-Key": key},
    ).status_code


@pytest.mark.parametrize(
    "case",
    [
        "SASL_PLAINTEXT/SCRAM-SHA-512",
        "SASL_PLAINTEXT/SCRAM-SHA-256, password file",
        "SASL_SSL/PLAIN",
        "SSL",
        "SSL, client certificate with encrypted key",
    ],
)
@pytest.mark.kafka
@pytest.mark.slow
def test_delivery_reaches_kafka_over(
    secure_kafka: SecureKafka, topic_prefix: str, tmp_path: Path, case: str
) -> None:
    """The bridge publishes over each security setup, and the record reads back with it."""
    settings = load_settings(environ=case_env(secure_kafka, case, topic_prefix, tmp_path))
    key = f"k-{uuid.uuid4()}"
    with TestClient(create_app(settings)) as client:
        assert post_order(client, key) == 202
    records = read_back(settings, topic_prefix)
    assert [(r.topic, r.key, r.value) for r in records] == [
        (f"{topic_prefix}.order.create", key.encode(), b'{"id":"o-1"}')
    ]


REFUSALS = {
    "wrong SCRAM password": (
        "SCRAM",
        scram(password=WRONG_PASSWORD),
        r"Kafka at 127\.0\.0\.1:\d+ rejected the credentials of user bridge \(SCRAM-SHA-512\): "
        r"Authentication failed .*invalid credentials.*; check BRIDGE_KAFKA_SASL_USERNAME",
    ),
    "wrong PLAIN password over TLS": (
        "SASLSSL",
        {
            **scram("PLAIN", WRONG_PASSWORD),
            "security_protocol": "SASL_SSL",
            "ssl_cafile": "{ca}",
        },
        r"rejected the credentials of user bridge \(PLAIN\)",
    ),
    "mechanism not offered": (
        "SCRAM",
        scram("PLAIN"),
        r"does not offer BRIDGE_KAFKA_SASL_MECHANISM=PLAIN",
    ),
    "SASL on a listener without it": (
        "PLAINTEXT",
        scram(),
        r"does not expect SASL on that port: check BRIDGE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT",
    ),
    "TLS to a plaintext listener": (
        "PLAINTEXT",
        {"security_protocol": "SSL", "ssl_cafile": "{ca}"},
        r"Kafka at 127\.0\.0\.1:\d+ closed the connection during the TLS handshake: is that "
        r"port a TLS listener\? check BRIDGE_KAFKA_SECURITY_PROTOCOL=SSL",
    ),
    "CA that did not sign the broker": (
        "TLS",
        {"security_protocol": "SSL", "ssl_cafile": "{other_ca}"},
        r"the TLS certificate of Kafka at 127\.0\.0\.1:\d+ was not accepted: "
        r"unable to get local issuer certificate; check BRIDGE_KAFKA_SSL_CAFILE",
    ),
    "no client certificate where one is required": (
        "MTLS",
        {"security_protocol": "SSL", "ssl_cafile": "{ca}"},
        r"refused the TLS connection \(.*CERTIFICATE\); check BRIDGE_KAFKA_SSL_CERTFILE",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
@pytest.mark.kafka
@pytest.mark.slow
def test_refused_settings_stop_app_startup(
    secure_kafka: SecureKafka, topic_prefix: str, case: str
) -> None:
    """Kafka refusing the credentials or TLS settings makes the app's startup raise a
    ConfigError that says why and names the settings to check (never the password)."""
    env, message = refusal_case(secure_kafka, case, topic_prefix)
    settings = load_settings(environ=env)
    with pytest.raises(ConfigError, match=message) as caught, TestClient(create_app(settings)):
        pass  # pragma: no cover - startup fails
    assert WRONG_PASSWORD not in str(caught.value)


def refusal_case(kafka: SecureKafka, case: str, prefix: str) -> tuple[dict[str, str], str]:
    """The settings of a REFUSALS case, its files filled in, and the message it expects."""
    listener, security, message = REFUSALS[case]
    paths = {"ca": str(kafka.tls.ca.cert), "other_ca": str(kafka.tls.other_ca.cert)}
    filled = {name: value.format(**paths) for name, value in security.items()}
    bootstrap = kafka.broker.bootstrap if listener == "PLAINTEXT" else kafka.bootstrap(listener)
    return bridge_env(bootstrap, prefix, **filled), message


OPERATOR_COMMANDS = {
    "topics list": ["topics", "list"],
    "topics create": ["topics", "create", "{prefix}.order.create"],
    "tail": ["tail", "{prefix}.order.create"],
    "deadletter list": ["deadletter", "list"],
    "deadletter replay": ["deadletter", "replay"],
}


def _operator_command(
    argv: list[str], env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], str]:
    """``bridge <argv>`` run in a process of its own, as the operator does; its result
    and the last line it wrote to stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "bridge", *argv],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, result.stderr.rstrip().splitlines()[-1]


@pytest.mark.parametrize(
    ("command", "case"),
    [("topics list", case) for case in REFUSALS]
    + [(command, "wrong SCRAM password") for command in list(OPERATOR_COMMANDS)[1:]],
)
@pytest.mark.kafka
@pytest.mark.slow
def test_refused_settings_are_named_by_the_operator_commands(
    secure_kafka: SecureKafka, topic_prefix: str, command: str, case: str
) -> None:
    """An operator command that Kafka refuses the settings of exits 2 with serve's line
    naming why and the settings to check, not aiokafka's "Unable to bootstrap".

    Run as the operator does, in a process of its own: a TLS connection closed as the
    command's event loop ends may be left to the garbage collector, which says so with
    a ResourceWarning that would fail whichever test of this process comes next."""
    env, message = refusal_case(secure_kafka, case, topic_prefix)
    env["BRIDGE_DEADLETTER_TOPIC"] = f"{topic_prefix}.deadletter"
    argv = [arg.format(prefix=topic_prefix) for arg in OPERATOR_COMMANDS[command]]
    result, last = _operator_command(argv, env)
    assert result.returncode == 2, result.stderr
    assert last.startswith("bridge: "), result.stderr
    assert re.search(message, last), result.stderr
    assert "Traceback" not in result.stderr
    assert WRONG_PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("listener", "protocol", "needs"),
    [
        ("SCRAM", "PLAINTEXT", "TLS or SASL"),
        ("TLS", "PLAINTEXT", "TLS or SASL"),
        ("SASLSSL", "SSL", "SASL"),
    ],
)
@pytest.mark.kafka
def test_a_listener_that_needs_more_security_is_hinted_at(
    secure_kafka: SecureKafka,
    topic_prefix: str,
    listener: str,
    protocol: str,
    needs: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client with less security than the listener needs (BRIDGE_KAFKA_SECURITY_PROTOCOL
    forgotten) is let in, then cut off at its first request: the operator commands said
    "no broker there answered (is Kafka running...)" and serve only "not reachable yet"
    (a review). Both now name the setting; only a hint, retried and exit 1: a broker at
    its connection limit does the same."""
    security = {"security_protocol": protocol}
    if protocol == "SSL":
        security["ssl_cafile"] = str(secure_kafka.tls.ca.cert)
    env = bridge_env(secure_kafka.bootstrap(listener), topic_prefix, **security)
    result, last = _operator_command(["topics", "list"], env)
    assert result.returncode == 1, result.stderr
    assert "took the connection and closed it at the first request" in last, result.stderr
    assert f"needs {needs} does that: check BRIDGE_KAFKA_SECURITY_PROTOCOL={protocol}" in last

    async def serve() -> None:
        publisher = KafkaPublisher(load_settings(environ=env), Metrics())
        await publisher.start()
        await publisher.stop()

    asyncio.run(serve())
    hinted = [r for r in caplog.records if "closed it at the first request" in r.getMessage()]
    assert hinted, caplog.text
    assert hinted[0].levelname == "WARNING"


@pytest.mark.kafka
@pytest.mark.slow
def test_wrong_password_stops_bridge_serve(
    secure_kafka: SecureKafka, topic_prefix: str, tmp_path: Path
) -> None:
    """``bridge serve`` with a refused password exits 2 with one line saying why, no
    traceback: with JSON logs (the default) a JSON line like the others (it was plain
    text, which a log pipeline reading JSON dropped)."""
    env = bridge_env(
        secure_kafka.bootstrap("SCRAM"),
        topic_prefix,
        **scram("SCRAM-SHA-256", WRONG_PASSWORD),
    )
    env |= {"BRIDGE_PORT": str(free_port()), "BRIDGE_HOST": "127.0.0.1"}
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert {k: lines[-1][k] for k in ("level", "logger")} == {"level": "error", "logger": "bridge"}
    assert re.fullmatch(
        r"Kafka at 127\.0\.0\.1:\d+ rejected the credentials of user bridge \(SCRAM-SHA-256\).*",
        lines[-1]["message"],
    ), output
    assert "Traceback" not in output
    assert WRONG_PASSWORD not in output


async def test_unreachable_kafka_is_retried_not_refused(topic_prefix: str) -> None:
    """With SASL on, an unreachable Kafka still means "unready and retrying", not a stop."""
    env = bridge_env(f"127.0.0.1:{free_port()}", topic_prefix, **scram())
    publisher = KafkaPublisher(load_settings(environ=env), Metrics())
    await publisher.start()  # no ConfigError
    try:
        assert not publisher.connected
    finally:
        await publisher.stop()


async def _forward(listen_port: int, to: str) -> asyncio.Server:
    """A TCP forwarder from 127.0.0.1:``listen_port`` to ``to`` (host:port): Kafka
    appearing at an address where nothing listened before."""
    host, port = to.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def connected(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        kafka_r, kafka_w = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(client_r, kafka_w), pipe(kafka_r, client_w))

    return await asyncio.start_server(connected, "127.0.0.1", listen_port)


@pytest.mark.kafka
async def test_a_refusal_after_an_unreachable_start_is_logged(
    secure_kafka: SecureKafka,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kafka not up yet when the bridge starts (a compose stack, a rollout), then refusing
    its password: the background retries say why, at ERROR (a review: retried for ever
    without a word, aiokafka's own line once a minute at best)."""
    monkeypatch.setattr(publisher_module, "EXPLAIN_SECONDS", 0.5)
    port = free_port()
    env = bridge_env(f"127.0.0.1:{port}", topic_prefix, **scram(password="not-the-password"))
    publisher = KafkaPublisher(load_settings(environ=env), Metrics())
    await publisher.start()  # nothing listens: "not reachable yet"
    forwarder = await _forward(port, secure_kafka.bootstrap("SCRAM"))
    try:
        await eventually(
            lambda: "rejected the credentials of user bridge" in caplog.text,
            within=30,
            every=0.1,
            what="the refusal logged",
        )
        refused = [r for r in caplog.records if "rejected the credentials" in r.getMessage()]
        assert refused[0].levelname == "ERROR"
        assert "not-the-password" not in caplog.text
        assert not publisher.connected
    finally:
        forwarder.close()
        await publisher.stop()


async def test_a_slow_start_does_not_hold_back_the_first_reason(
    topic_prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The try at startup timed out (no reason asked: Kafka did not answer at all), so
    the first background try asks why, and the refusal is logged then, not 30 s on (a
    review: the throttle counted the startup try as having asked)."""

    class SlowThenRefused(AIOKafkaProducer):  # type: ignore[misc]
        tries = 0

        async def start(self) -> None:
            SlowThenRefused.tries += 1
            if SlowThenRefused.tries == 1:
                await asyncio.sleep(60)  # past BRIDGE_KAFKA_CONNECT_TIMEOUT
            raise KafkaConnectionError("Unable to bootstrap")

    async def refused(_settings: object, _options: object) -> tuple[str, None]:
        return "Kafka at k:9092 rejected the credentials of user bridge", None

    monkeypatch.setattr(publisher_module, "AIOKafkaProducer", SlowThenRefused)
    monkeypatch.setattr(publisher_module, "kafka_diagnosis", refused)
    env = bridge_env("127.0.0.1:9", topic_prefix) | {"BRIDGE_KAFKA_CONNECT_TIMEOUT": "1"}
    publisher = KafkaPublisher(load_settings(environ=env), Metrics())
    await publisher.start()
    try:
        await eventually(
            lambda: "rejected the credentials" in caplog.text,
            within=publisher_module.EXPLAIN_SECONDS / 3,
            every=0.1,
            what="the refusal logged by the first background try",
        )
    finally:
        await publisher.stop()


async def test_an_unforeseen_error_while_connecting_is_retried(
    kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error aiokafka raises that is no KafkaError (its SCRAM code raises ValueError
    for a server signature it does not accept) ended the task that keeps the bridge
    connected, leaking the producer: it never connected again (a review)."""
    calls: list[int] = []
    stopped: list[int] = []

    class Flaky(AIOKafkaProducer):  # type: ignore[misc]
        async def start(self) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise KafkaConnectionError("Unable to bootstrap (not up yet)")
            if len(calls) == 2:
                raise ValueError("Server sent wrong signature!")
            await super().start()

        async def stop(self) -> None:
            stopped.append(len(calls))
            await super().stop()

    monkeypatch.setattr(publisher_module, "AIOKafkaProducer", Flaky)
    publisher = KafkaPublisher(
        load_settings(environ=bridge_env(kafka_bootstrap, topic_prefix)), Metrics()
    )
    await publisher.start()
    try:
        await eventually(lambda: publisher.connected, within=30, every=0.1, what="connected")
        assert len(calls) == 3
        assert stopped[:2] == [1, 2]  # the producers that failed to start were closed
        await publisher.publish(Destination(f"{topic_prefix}.order.create", b"k", b"{}", []))
    finally:
        await publisher.stop()


# Kafka's own admin API, as `kafka-configs --alter --add-config 'SCRAM-SHA-512=[...]'`
# would call it (that tool is not among the broker's jars).
SET_SCRAM_PASSWORD_JAVA = """
import java.util.List;
import java.util.Properties;
import org.apache.kafka.clients.admin.*;

public class SetScramPassword {
    public static void main(String[] args) throws Exception {
        Properties config = new Properties();
        config.put("bootstrap.servers", args[0]);
        try (Admin admin = Admin.create(config)) {
            ScramCredentialInfo info = new ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192);
            admin.alterUserScramCredentials(
                List.of(new UserScramCredentialUpsertion(args[1], info, args[2]))).all().get();
        }
    }
}
"""


async def set_scram_password(kafka: SecureKafka, user: str, password: str, folder: Path) -> None:
    source = folder / "SetScramPassword.java"
    source.write_text(SET_SCRAM_PASSWORD_JAVA)
    # the broker's own Java and jars (JAVA_HOME first, like the broker itself)
    libs = ensure_jars(kafka.broker.home)
    java = await asyncio.create_subprocess_exec(
        find_java(), "-cp", f"{libs}/*", str(source), kafka.broker.bootstrap, user, password,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(java.communicate(), 120)
    assert java.returncode == 0, output.decode()


def rotations(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "bridge_kafka_secret_rotations_total", {"result": result}
    )
    return value or 0.0


async def wait_for_rotations(metrics: Metrics, result: str, count: int) -> None:
    await eventually(
        lambda: rotations(metrics, result) >= count,
        within=30,
        every=0.1,
        what=f"{count} {result} rotation(s)",
    )


@pytest.mark.kafka
@pytest.mark.slow
async def test_rotated_password_file_is_used_without_restart(
    secure_kafka: SecureKafka, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When Kafka and the password file change, the bridge reconnects with the new
    password; a password Kafka refuses leaves the working connection in use."""
    monkeypatch.setattr(publisher_module, "HEARTBEAT_SECONDS", 0.2)  # look often
    old, new = ROTATION_PASSWORDS
    secret = tmp_path / "kafka-password"
    secret.write_text(old + "\n")
    security = {**scram(), "sasl_username": "rotator", "sasl_password_file": str(secret)}
    del security["sasl_password"]
    settings = load_settings(
        environ=bridge_env(secure_kafka.bootstrap("SCRAM"), topic_prefix, **security)
    )
    metrics = Metrics()
    publisher = KafkaPublisher(settings, metrics)
    topic = f"{topic_prefix}.order.create"

    def record(key: str) -> Destination:
        return Destination(topic=topic, key=key.encode(), value=b"{}", headers=[])

    await publisher.start()
    try:
        await publisher.publish(record("before"))
        await set_scram_password(secure_kafka, "rotator", new, tmp_path)
        # From now on a new connection with the old password is refused: without the
        # rotation, the bridge would fail at its next reconnect.
        assert (await kafka_diagnosis(settings, kafka_client_options(settings)))[0] is not None

        secret.write_text(new + "\n")
        await wait_for_rotations(metrics, "applied", 1)
        assert (await kafka_diagnosis(settings, kafka_client_options(settings)))[0] is None
        await publisher.publish(record("after"))

        secret.write_text(WRONG_PASSWORD + "\n")  # Kafka does not know this one
        await wait_for_rotations(metrics, "refused", 1)
        await publisher.publish(record("still"))  # through the connection made before
        assert publisher.connected
        assert rotations(metrics, "applied") == 1
    finally:
        await publisher.stop()
    secret.write_text(new + "\n")
    records = await read_back_async(settings, topic_prefix)
    assert sorted(r.key for r in records) == [b"after", b"before", b"still"]


def test_secrets_fingerprint_follows_the_files(tmp_path: Path) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text("one\n")
    env = bridge_env("127.0.0.1:9092", "t", **scram())
    del env["BRIDGE_KAFKA_SASL_PASSWORD"]
    settings = load_settings(environ={**env, "BRIDGE_KAFKA_SASL_PASSWORD_FILE": str(secret)})
    first = secrets_fingerprint(settings)
    assert secrets_fingerprint(settings) == first
    secret.write_text("two\n")
    changed = secrets_fingerprint(settings)
    assert changed != first
    secret.unlink()  # halfway through a rotation
    assert secrets_fingerprint(settings) not in {first, changed}
    # secrets from the environment cannot change: nothing to look at
    assert secrets_fingerprint(load_settings(environ=bridge_env("127.0.0.1:9092", "t"))) == b""


# --- Settings (no broker) ------------------------------------------------------------


def test_security_defaults_to_plaintext() -> None:
    """By default the client options ask for PLAINTEXT and carry no credentials or TLS."""
    settings = load_settings(environ={"BRIDGE_TOKENS": TOKEN})
    assert settings.kafka_security_protocol == "PLAINTEXT"
    assert settings.kafka_ssl_check_hostname is True
    options = kafka_client_options(settings)
    assert options["security_protocol"] == "PLAINTEXT"
    assert not {k for k in options if k.startswith(("sasl_", "ssl_"))}


def test_every_client_waits_the_request_timeout_for_an_answer() -> None:
    """The operator commands' clients wait BRIDGE_KAFKA_REQUEST_TIMEOUT for a broker, as
    the producer does (they waited the Kafka client's 40 s), and a reader's fetch asks
    for an answer well within it (a fetch waiting longer than its timeout would time
    out, and its connection be closed, whenever no record came)."""
    settings = load_settings(
        environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_KAFKA_REQUEST_TIMEOUT": "0.4"}
    )
    options = kafka_client_options(settings)

    async def built() -> None:
        consumer = reader(options)
        admin = AIOKafkaAdminClient(**options)
        producer = AIOKafkaProducer(**options)
        try:
            assert consumer._client._request_timeout_ms == 400
            assert consumer._fetch_max_wait_ms == 200
            assert admin._client._request_timeout_ms == 400
            assert producer.client._request_timeout_ms == 400
        finally:
            await consumer.stop()
            await admin.close()
            await producer.stop()

    asyncio.run(built())
    tiny = load_settings(environ={"BRIDGE_TOKENS": TOKEN, "BRIDGE_KAFKA_REQUEST_TIMEOUT": "0.0005"})
    assert kafka_client_options(tiny)["request_timeout_ms"] == 1  # above 0, as the setting


def test_client_options_carry_sasl_and_tls(tls: TlsFiles, tmp_path: Path) -> None:
    """SASL_SSL options hold the credentials and a fresh verifying TLS context per call."""
    secret = tmp_path / "password"
    secret.write_text("first\n")
    env = bridge_env(
        "k:9093",
        "p",
        security_protocol="sasl_ssl",  # case does not matter
        sasl_mechanism="scram-sha-512",
        sasl_username="bridge",
        sasl_password_file=secret,
        ssl_cafile=tls.ca.cert,
        ssl_certfile=tls.client.cert,
        ssl_keyfile=tls.client.key,
        ssl_keyfile_password_file=tls.key_password_file,
        ssl_check_hostname="false",
    )
    settings = load_settings(environ=env)
    options = kafka_client_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "bridge"
    assert options["sasl_plain_password"] == "first"
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is False
    secret.write_text("rotated")  # a Kubernetes Secret updated in place
    again = kafka_client_options(settings)
    assert again["sasl_plain_password"] == "rotated"
    assert again["ssl_context"] is not context


@pytest.mark.parametrize("content", [b"\n", b"l\xf6senord\n"], ids=["emptied", "not-utf-8"])
@pytest.mark.parametrize("setting", ["sasl_password_file", "ssl_keyfile_password_file"])
def test_a_password_file_spoiled_after_start_is_named(
    tls: TlsFiles, tmp_path: Path, setting: str, content: bytes
) -> None:
    """Read again at each connection (a rotation, a producer replaced): a password file
    emptied or rewritten in another encoding since the start is refused naming the
    setting. An empty SASL password was sent, and Kafka's refusal of the user's
    credentials blamed the wrong thing; a Latin-1 one gave Python's decoding error,
    with one byte of the password and no setting."""
    secret = tmp_path / "spoiled"
    secret.write_bytes(tls.key_password_file.read_bytes())
    files = {
        "sasl_password_file": tls.key_password_file,
        "ssl_keyfile_password_file": tls.key_password_file,
    }
    env = bridge_env(
        "k:9093",
        "p",
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="bridge",
        ssl_cafile=tls.ca.cert,
        ssl_certfile=tls.client.cert,
        ssl_keyfile=tls.client.key,
        **{**files, setting: secret},
    )
    settings = load_settings(environ=env)
    kafka_client_options(settings)
    secret.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        kafka_client_options(settings)
    why = "is empty" if content == b"\n" else "is not UTF-8 text"
    assert f"BRIDGE_KAFKA_{setting.upper()}: {secret} {why}" in str(caught.value)
    assert "0xf6" not in str(caught.value)


def test_passwords_are_never_shown(tls: TlsFiles, capsys: pytest.CaptureFixture[str]) -> None:
    """The SASL password appears neither in redacted(), repr(), str() nor check-config's output."""
    env = bridge_env("k:9093", "p", **scram(password="hunter2-Kafka"))
    settings = load_settings(environ=env)
    for shown in (str(settings.redacted()), repr(settings), str(settings)):
        assert "hunter2-Kafka" not in shown
    assert settings.kafka_sasl_secret() == "hunter2-Kafka"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert '"kafka_sasl_username": "bridge"' in out
    assert "hunter2-Kafka" not in out


@pytest.mark.parametrize(
    ("security", "message"),
    [
        (
            {"security_protocol": "SASL_SSL"},
            "BRIDGE_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs BRIDGE_KAFKA_SASL_MECHANISM and "
            "BRIDGE_KAFKA_SASL_USERNAME",
        ),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"},
            "needs BRIDGE_KAFKA_SASL_USERNAME",
        ),
        (
            {k: v for k, v in scram().items() if k != "sasl_password"},
            "needs exactly one of BRIDGE_KAFKA_SASL_PASSWORD and BRIDGE_KAFKA_SASL_PASSWORD_FILE",
        ),
        (
            {**scram(), "sasl_password_file": "{ca}"},
            "needs exactly one of BRIDGE_KAFKA_SASL_PASSWORD and BRIDGE_KAFKA_SASL_PASSWORD_FILE",
        ),
        (
            {"sasl_username": "bridge"},
            "BRIDGE_KAFKA_SASL_USERNAME set, but BRIDGE_KAFKA_SECURITY_PROTOCOL=PLAINTEXT uses "
            "no SASL",
        ),
        (
            {**scram(), "ssl_cafile": "{ca}"},
            "BRIDGE_KAFKA_SSL_CAFILE set, but BRIDGE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT "
            "uses no TLS",
        ),
        (
            {"security_protocol": "SSL", "ssl_certfile": "{cert}"},
            "BRIDGE_KAFKA_SSL_CERTFILE and BRIDGE_KAFKA_SSL_KEYFILE go together",
        ),
        (
            {"security_protocol": "SSL", "ssl_keyfile_password_file": "{ca}"},
            "BRIDGE_KAFKA_SSL_KEYFILE_PASSWORD_FILE needs BRIDGE_KAFKA_SSL_KEYFILE",
        ),
        ({"security_protocol": "TLS"}, "BRIDGE_KAFKA_SECURITY_PROTOCOL: Input should be"),
        ({**scram(), "sasl_mechanism": "GSSAPI"}, "BRIDGE_KAFKA_SASL_MECHANISM: Input should be"),
    ],
)
def test_inconsistent_security_settings_are_named(
    tls: TlsFiles, security: dict[str, str], message: str
) -> None:
    """Settings that cannot work together stop startup with a message naming them."""
    paths = {"ca": str(tls.ca.cert), "cert": str(tls.client.cert)}
    filled = {name: value.format(**paths) for name, value in security.items()}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_settings(environ=bridge_env("k:9093", "p", **filled))


@pytest.mark.parametrize(
    "setting",
    [
        "sasl_password_file",
        "ssl_cafile",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_keyfile_password_file",
    ],
)
def test_missing_or_unreadable_files_are_named(tls: TlsFiles, tmp_path: Path, setting: str) -> None:
    """Every file setting is read at load time; a missing, unreadable or empty file is named
    with its path (but a password file that is not there), by load_settings and by
    ``bridge check-config`` (exit 2)."""
    security: dict[str, str | Path] = (
        {k: v for k, v in scram().items() if k != "sasl_password"}
        if setting == "sasl_password_file"
        else {
            "security_protocol": "SSL",
            "ssl_cafile": tls.ca.cert,
            "ssl_certfile": tls.client.cert,
            "ssl_keyfile": tls.client.key,
            "ssl_keyfile_password_file": tls.key_password_file,
        }
    )
    empty = tmp_path / "empty"
    empty.write_text("\n")
    latin = tmp_path / "latin-1"
    latin.write_bytes(b"l\xf6senord\n")  # a password's bytes, never quoted
    marked = tmp_path / "byte-order-mark"
    marked.write_bytes("\ufeff\n".encode())  # empty once read: refused only when connecting
    cases = (
        [(latin, f"{latin} is not UTF-8 text"), (marked, f"{marked} is empty")]
        if setting.endswith("password_file")
        else []
    )
    for bad, why in [
        *cases,
        (
            tmp_path / "missing.pem",
            # a password's file that is not there is not named: it may be the password
            "cannot read the file it names: No such file"
            if setting.endswith("password_file")
            else f"cannot read {tmp_path / 'missing.pem'}: No such file",
        ),
        (tmp_path, f"cannot read {tmp_path}: Is a directory"),  # root could read a chmod 000
        (empty, f"{empty} is empty"),
    ]:
        env = bridge_env("k:9093", "p", **{**security, setting: bad})
        with pytest.raises(ConfigError) as caught:
            load_settings(environ=env)
        assert f"BRIDGE_KAFKA_{setting.upper()}: {why}" in str(caught.value)
        assert "0xf6" not in str(caught.value)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        assert main(["check-config"]) == 2


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"ssl_cafile": "{key}"}, "BRIDGE_KAFKA_SSL_CAFILE: .* holds no PEM CA certificate"),
        (
            {"ssl_certfile": "{cert}", "ssl_keyfile": "{other_key}"},
            "the key does not belong to the certificate",
        ),
        (
            {"ssl_certfile": "{cert}", "ssl_keyfile": "{key}"},
            "the key is encrypted: set BRIDGE_KAFKA_SSL_KEYFILE_PASSWORD_FILE",
        ),
        (
            {"ssl_certfile": "{cert}", "ssl_keyfile": "{key}", "ssl_keyfile_password_file": "{ca}"},
            "not PEM, or the key password is wrong",
        ),
    ],
)
def test_tls_files_must_hold_what_they_should(
    tls: TlsFiles, files: dict[str, str], message: str
) -> None:
    """A CA file without a CA, a key of another certificate, or a wrong key password is named
    at load time, not at the first connection."""
    paths = {
        "ca": str(tls.ca.cert),
        "cert": str(tls.client.cert),
        "key": str(tls.client.key),
        "other_key": str(tls.broker.key),
    }
    filled = {name: value.format(**paths) for name, value in files.items()}
    env = bridge_env("k:9093", "p", security_protocol="SSL", **filled)
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=env)


def test_local_kafka_renders_extra_listeners(tmp_path: Path) -> None:
    """LocalKafka adds the extra listeners to server.properties, lets extra properties
    override its defaults, and refuses listeners the broker would refuse."""
    broker = LocalKafka(
        tmp_path / "home",
        tmp_path / "data",
        9092,
        9093,
        listeners=[Listener("SCRAM", 9094, "SASL_PLAINTEXT")],
        extra_properties={"num.partitions": "2", "listener.name.scram.x": "y"},
    )
    properties = dict(line.split("=", 1) for line in broker.server_properties().splitlines()[1:])
    assert properties["listeners"].endswith(",SCRAM://127.0.0.1:9094")
    assert properties["advertised.listeners"] == (
        "PLAINTEXT://127.0.0.1:9092,SCRAM://127.0.0.1:9094"
    )
    assert properties["listener.security.protocol.map"].endswith(",SCRAM:SASL_PLAINTEXT")
    assert properties["num.partitions"] == "2"
    assert properties["listener.name.scram.x"] == "y"
    assert broker.listener_bootstrap("SCRAM") == "127.0.0.1:9094"
    for bad in [
        Listener("scram", 9094, "SASL_PLAINTEXT"),
        Listener("CONTROLLER", 9094, "SSL"),
        Listener("TLS", 9094, "TLS"),
        Listener("TLS", 9093, "SSL"),
    ]:
        with pytest.raises(ValueError, match="listener"):
            LocalKafka(tmp_path / "home", tmp_path / "data", 9092, 9093, listeners=[bad])
