"""Which partition a record goes to: Kafka's default rule, without Python's cost.

Records with the same key must land on the same partition as the Java client
(and every other Kafka client) would put them: ``murmur2(key) & 0x7fffffff``
modulo the partition count. aiokafka's own ``murmur2`` reads one byte at a time
and costs about 6.5 µs for a UUID key, the largest single item of the Kafka
client's per-record work in the bridge's profile. The compiled MurmurHash2 of
the ``murmurhash2`` package (the same algorithm; Kafka only fixes the seed)
costs 0.2 µs. Where it has no wheel (musl), :func:`murmur2_python` stands in:
it reads four-byte words at once and costs half of aiokafka's.
tests/test_partitioner.py checks all of them agree on every input.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence


def _compiled() -> Callable[[bytes, int], int] | None:
    try:
        from murmurhash2 import murmurhash2  # noqa: PLC0415  # optional at run time
    except ImportError:  # pragma: no cover  # no wheel for this platform
        return None
    return murmurhash2


compiled_murmurhash2 = _compiled()

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2_python(data: bytes) -> int:
    """Kafka's 32-bit MurmurHash2 of ``data`` (org.apache.kafka.common.utils.Utils.murmur2)."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    words = length >> 2
    if words:
        for word in struct.unpack_from(f"<{words}I", data):
            k = (word * _M) & _MASK
            k ^= k >> 24
            h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    tail = length & 3
    if tail:
        base = length - tail
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h ^= data[base]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def _murmur2_compiled(data: bytes) -> int:
    assert compiled_murmurhash2 is not None  # noqa: S101  # only chosen when it imported
    return compiled_murmurhash2(data, _SEED)


#: Kafka's 32-bit MurmurHash2 of a key: compiled where available.
murmur2: Callable[[bytes], int] = (
    murmur2_python if compiled_murmurhash2 is None else _murmur2_compiled
)


def partition_index(key: bytes, count: int) -> int:
    """Kafka's default partition for ``key`` in a topic of ``count`` partitions."""
    if compiled_murmurhash2 is not None:
        return (compiled_murmurhash2(key, _SEED) & 0x7FFFFFFF) % count
    return (murmur2_python(key) & 0x7FFFFFFF) % count


def partition_for(key: bytes, partitions: Sequence[int]) -> int:
    """The partition of ``key`` among ``partitions`` (all of the topic's, sorted)."""
    return partitions[partition_index(key, len(partitions))]


class KeyPartitioner:
    """An aiokafka ``partitioner``: Kafka's default rule, with the faster hash."""

    def __call__(
        self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
    ) -> int:
        if key is None:  # the bridge always sets a key; kept for aiokafka's contract
            return random.choice(available or all_partitions)  # noqa: S311  # not security
        return partition_for(key, all_partitions)
