"""Helpers and vendored data for tests/test_deploy.py and tests/test_prometheus.py."""
