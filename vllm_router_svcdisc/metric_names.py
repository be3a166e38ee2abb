"""Internal: the prefix of the package's own Prometheus metric names.

A module of its own so that the scraper (which records its scrape durations and failures) and
the telemetry collector (which exposes them) both read it without importing each other.
"""

PREFIX = "vllm_svcdisc"
