"""atheris fuzz target: any bytes as a delivery must give an Event or a clean 4xx.

Run by tests/test_fuzz.py for a bounded time; also by hand:
``python -m tests.fuzz_parse -max_total_time=60``.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from urllib.parse import parse_qsl

import atheris

with atheris.instrument_imports():
    from bridge.deadletter import dead_letter
    from bridge.errors import BridgeError
    from bridge.geins import Delivery, parse_delivery
    from bridge.redaction import Redactor
    from bridge.routing import TOPIC_NAME, Router, TopicTemplate

ROUTER = Router(
    TopicTemplate("{account}.{environment}.{entity}.{action}"),
    default_account="shop",
    default_environment="prod",
    ce_source="urn:geins",
)
RECEIVED = datetime(2026, 1, 1, tzinfo=UTC)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    method = fdp.PickValueInList(["GET", "POST", "PUT"])
    path_entity = fdp.ConsumeUnicodeNoSurrogates(70) if fdp.ConsumeBool() else None
    path_action = fdp.ConsumeUnicodeNoSurrogates(70) if fdp.ConsumeBool() else None
    query = parse_qsl(fdp.ConsumeBytes(120).decode("latin-1"), keep_blank_values=True)
    headers = [
        (fdp.PickValueInList([b"x-idempotency-key", b"x-timestamp", b"content-type"]),
         fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 260)))
        for _ in range(fdp.ConsumeIntInRange(0, 4))
    ]  # fmt: skip
    strict_types = fdp.ConsumeBool()  # before the body, which takes all that is left
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    delivery = Delivery(
        method=method,
        path="/webhooks/geins",
        path_entity=path_entity,
        path_action=path_action,
        query=query,
        headers=headers,
        body=body,
        received_at=RECEIVED,
    )
    try:
        event = parse_delivery(delivery, strict_types=strict_types)
    except BridgeError as error:
        if not 400 <= error.status < 500:
            raise AssertionError(f"status {error.status} for a bad delivery") from error
        # must not raise either
        dead_letter(delivery, error, "geins.deadletter", Redactor(["secret"]))
        return
    topic = ROUTER.route(event).topic
    if not TOPIC_NAME.fullmatch(topic):
        raise AssertionError(f"illegal topic {topic!r}")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
