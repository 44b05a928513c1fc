"""The gateway process: the public gRPC and OpenAI-compatible HTTP doors, validation and
tokenization, P/D-Serve routing (scenario groups, forwarding upon rejection, the shared
queue), the token relay and detokenization."""
