"""Shared building blocks of every pdserve service: config, errors, gRPC server
plumbing, telemetry, the Redis registry, the KV layout and the KV transports.

Nothing here imports torch; the model-facing code lives in ``services.engine``.
"""
