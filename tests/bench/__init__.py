"""The benchmark harness behind ``make bench`` (never collected by pytest: no test_*.py)."""
