"""The bridge: receives Geins webhooks and publishes them to Apache Kafka."""
