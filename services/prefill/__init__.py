"""The prefill process: admits prompts into b_p slots (or rejects them), runs them on the model
thread, and hands each request's KV off as one contiguous buffer."""
