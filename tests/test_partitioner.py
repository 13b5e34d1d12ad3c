"""The bridge's murmur2 partitioner agrees with aiokafka's (and so with Java's)."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from bridge import partitioner
from bridge.partitioner import KeyPartitioner, murmur2, murmur2_python, partition_for


def test_the_compiled_hash_is_installed() -> None:
    """pyproject.toml depends on murmurhash2 and it has wheels for glibc Linux, macOS
    and Windows: the Python stand-in is for platforms without one."""
    assert partitioner.compiled_murmurhash2 is not None
    assert murmur2 is not murmur2_python


@given(st.binary(max_size=300))
def test_murmur2_matches_aiokafka(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data)
    assert murmur2_python(data) == aiokafka_murmur2(data)


def test_murmur2_known_values_from_the_java_client() -> None:
    # The Java client's UtilsTest.testMurmur2 vectors, as unsigned 32-bit values.
    cases = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for data, signed in cases.items():
        assert murmur2(data) == signed & 0xFFFFFFFF, data
        assert murmur2_python(data) == signed & 0xFFFFFFFF, data


@given(st.binary(min_size=1, max_size=64), st.integers(min_value=1, max_value=64))
def test_the_partition_is_the_default_partitioners(key: bytes, count: int) -> None:
    partitions = list(range(count))
    expected = DefaultPartitioner()(key, partitions, partitions)
    assert partition_for(key, partitions) == expected
    assert KeyPartitioner()(key, partitions, partitions) == expected


def test_records_without_a_key_go_to_an_available_partition() -> None:
    assert KeyPartitioner()(None, [0, 1, 2], [2]) == 2
    assert KeyPartitioner()(None, [0, 1, 2], []) in (0, 1, 2)
