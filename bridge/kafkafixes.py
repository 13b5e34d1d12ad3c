"""Mends to aiokafka 0.14, applied once when this module is imported (by
:mod:`bridge.publisher`, through which every Kafka client of the bridge gets its
options).

**A start cut short.**

A client's start cancelled while it bootstrapped (the bridge bounds every start with a
deadline: the producer's, the admin client's of ``bridge topics``, the readers' of the
operator commands) left the connection it had opened to a bootstrap server open and
owned by no one: ``AIOKafkaClient.bootstrap`` closes it on a Kafka error or a timeout of
its own, not on a cancellation. Its socket stayed open until the garbage collector found
it, and aiokafka's ``__del__`` then reported an "Unclosed AIOKafkaConnection" through
the event loop's exception handler: an ERROR line in the bridge's log (and a failed test
run, where warnings are errors). Some 5% of starts cut short so leaked one.

**gzip's level.** aiokafka compresses a gzip batch at level 9, on the event loop: some
100 ms for a batch of 1 MB of JSON, every request waiting meanwhile. Level 6, zlib's
default and Kafka's Java producer's (compression.gzip.level), took a quarter of that
for a batch 0.6 % larger.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from typing import Any

import aiokafka.client
import aiokafka.record.default_records
from aiokafka import codec
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import AIOKafkaConnection

#: The connections a bootstrap opened, with the task running it (a task the bootstrap
#: starts copies this context, and must not add its own connections to the list).
_opened_by: contextvars.ContextVar[tuple[asyncio.Task[Any] | None, list[AIOKafkaConnection]]] = (
    contextvars.ContextVar("_opened_by")
)

_create_conn = aiokafka.client.create_conn
_bootstrap = AIOKafkaClient.bootstrap


async def _create_conn_noted(*args: Any, **kwargs: Any) -> AIOKafkaConnection:
    conn: AIOKafkaConnection = await _create_conn(*args, **kwargs)
    opened = _opened_by.get(None)
    if opened is not None and opened[0] is asyncio.current_task():
        opened[1].append(conn)
    return conn


async def _bootstrap_closing_on_cancel(self: AIOKafkaClient) -> None:
    """``AIOKafkaClient.bootstrap``, which closes the connections it opened and did not
    keep when it ends by an exception, a cancellation included."""
    opened: list[AIOKafkaConnection] = []
    token = _opened_by.set((asyncio.current_task(), opened))
    try:
        await _bootstrap(self)
    except BaseException:
        kept = self._conns.values()
        for conn in opened:
            if conn not in kept:
                conn.close()
        raise
    finally:
        _opened_by.reset(token)


aiokafka.client.create_conn = _create_conn_noted
AIOKafkaClient.bootstrap = _bootstrap_closing_on_cancel

#: The level of the gzip codec's batches (see the module's docstring).
GZIP_LEVEL = 6


def _gzip_encode(payload: bytes, compresslevel: int | None = None) -> bytes:
    compressed: bytes = codec.gzip_encode(payload, compresslevel or GZIP_LEVEL)
    return compressed


# The batch builders call the name they imported: the Python one's, and the compiled
# one's that aiokafka uses when it is installed (it is, with the wheels).
aiokafka.record.default_records.gzip_encode = _gzip_encode
with contextlib.suppress(ImportError):
    from aiokafka.record._crecords import default_records as _compiled_records

    _compiled_records.gzip_encode = _gzip_encode
