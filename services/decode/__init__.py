"""The decode process: reserves paged-pool blocks, fetches each request's KV once into them,
and steps every active request in one continuous batch."""
