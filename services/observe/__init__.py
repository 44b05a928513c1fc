"""What operators see of every process: OpenTelemetry traces (``telemetry``) and
Prometheus metrics with the /metrics server (``metrics``)."""
