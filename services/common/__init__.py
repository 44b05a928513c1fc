"""What every pdserve process shares: config, errors, gRPC server plumbing (runtime), auth,
metrics, telemetry, the Redis registry and key names, and task helpers. Nothing here
imports torch; the KV transports are ``services.kv``, model facts ``services.model``."""
