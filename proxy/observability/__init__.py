"""Metrics, the per-request record and the log format."""
