"""Model execution with torch + transformers: preparing models, prefill, decode,
sampling, and packing a request's KV into the contiguous transfer buffer.
Only prefill, decode and device processes import this package."""
