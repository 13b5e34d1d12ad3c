"""One delivery's way through the bridge, free of HTTP: parse, route, deliver.

The ingress hands in a :class:`~bridge.geins.Delivery` and gets back an
:class:`Accepted` or a :class:`~bridge.errors.BridgeError`. How an event is made
safe before the answer is the :class:`AckMode`'s business; today that is
``broker`` (the answer waits for Kafka's acknowledgement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from bridge.errors import BridgeError
from bridge.geins import Delivery, Event, parse_delivery
from bridge.routing import Destination, Router


@dataclass(frozen=True, slots=True)
class Accepted:
    """The event is safe by the guarantee ``ack`` names."""

    event: Event
    topic: str
    ack: str


class AckMode(Protocol):
    """What must happen to a record before the sender hears 2xx."""

    name: str

    async def deliver(self, destination: Destination) -> None:
        """Return once the record is safe by this mode's guarantee; raise a BridgeError if not."""

    @property
    def ready(self) -> bool:
        """Whether deliveries can be made safe right now (what /readyz reports)."""


class Publisher(Protocol):
    """What :class:`~bridge.publisher.KafkaPublisher` offers; unit tests pass fakes."""

    @property
    def connected(self) -> bool: ...

    async def start(self) -> None: ...

    async def publish(self, destination: Destination) -> None: ...

    async def stop(self) -> None: ...


class BrokerAck:
    """Answer 2xx only after Kafka acknowledged the record (acks=all). No local state."""

    name = "broker"

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher

    async def deliver(self, destination: Destination) -> None:
        await self._publisher.publish(destination)

    @property
    def ready(self) -> bool:
        return self._publisher.connected


class Pipeline:
    """Parse, route and deliver one delivery."""

    def __init__(self, router: Router, ack_mode: AckMode, *, strict_types: bool) -> None:
        self.router = router
        self.ack_mode = ack_mode
        self._strict_types = strict_types

    async def handle(self, delivery: Delivery) -> Accepted:
        event = parse_delivery(delivery, strict_types=self._strict_types)
        destination = self.router.route(event)
        try:
            await self.ack_mode.deliver(destination)
        except BridgeError as exc:
            exc.event = event
            raise
        return Accepted(event=event, topic=destination.topic, ack=self.ack_mode.name)
