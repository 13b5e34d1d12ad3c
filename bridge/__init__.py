"""The bridge: receives Geins webhooks and publishes them to Apache Kafka."""

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed version (``bridge --version``, the bridge_build_info metric)."""
    try:
        return version("geins-kafka-bridge")
    except PackageNotFoundError:  # running from a source tree without install
        return "unknown"
