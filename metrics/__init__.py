"""Prometheus metrics of the VMM and the host daemon (prometheus-client)."""
