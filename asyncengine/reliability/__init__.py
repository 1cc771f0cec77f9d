"""Reliability: typed per-request errors and the fault-injection test hook."""
