"""The bridge with webhook requests cut short at one layer, to price each layer.

``python -m tests.bench.subject cli --cut LAYER`` runs ``bridge serve`` with
one of these patches applied first. Measured at saturation next to the whole
bridge, the differences in CPU per request say what each layer costs, which is
what the issue asks for where a target is out of reach:

- ``server``: webhook requests are answered 202 as soon as their body is read,
  before the bridge's guard: uvicorn, httptools and the bridge's HTTP protocol.
- ``guard``: answered by the endpoint without looking at the request: adds the
  guard (limits, concurrency) and the webhook dispatch.
- ``kafka``: the whole bridge (endpoint, parsing and its token checks, routing,
  the record size check, the ack mode with its de-duplication) but for the
  Kafka producer: ``KafkaPublisher.publish`` returns at once, as if Kafka had
  acknowledged. An earlier version stopped before the token checks, the size
  check and the ack mode, and so charged them to Kafka (a review: some 2-4 µs).
- ``nometrics``: the whole bridge with the request-path metrics calls replaced
  by no-ops: the difference is what the Prometheus metrics cost per request.

Only for benchmarks: each patch breaks the bridge's promises on purpose.
"""

from __future__ import annotations

from typing import Any

import orjson

CUTS = ("server", "guard", "kafka", "nometrics")

_BODY = orjson.dumps({"status": "accepted", "topic": "cut", "key": "cut", "ack": "cut"})
_HEAD = {
    "type": "http.response.start",
    "status": 202,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_BODY))],
}


async def _read_and_answer(receive: Any, send: Any) -> None:
    while (await receive()).get("more_body", False):
        pass
    await send(_HEAD)
    await send({"type": "http.response.body", "body": _BODY})


def install(cut: str) -> None:
    """Apply the patch for ``cut`` (one of :data:`CUTS`) to the bridge's classes."""
    # Imported here: the subject process imports this module only when asked to cut.
    from bridge import app, ingress, metrics, publisher  # noqa: PLC0415

    if cut == "server":
        whole = app.BridgeApp.__call__

        async def answer_at_once(self: Any, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and ingress.is_webhook_path(scope["path"]):
                await _read_and_answer(receive, send)
            else:
                await whole(self, scope, receive, send)

        app.BridgeApp.__call__ = answer_at_once  # type: ignore[method-assign]
    elif cut == "guard":

        async def endpoint(self: Any, scope: Any, receive: Any, send: Any) -> None:
            await _read_and_answer(receive, send)

        ingress.WebhookEndpoint.__call__ = endpoint  # type: ignore[method-assign]
    elif cut == "kafka":

        async def acknowledged_at_once(self: Any, destination: Any) -> None:
            pass

        publisher.KafkaPublisher.publish = acknowledged_at_once  # type: ignore[method-assign]
    elif cut == "nometrics":

        def nothing(*_: object) -> None:
            pass

        for name in ("record_request", "record_published", "observe_stage"):
            setattr(metrics.Metrics, name, nothing)
    else:
        msg = f"unknown cut {cut!r}; one of {', '.join(CUTS)}"
        raise ValueError(msg)
