"""pdserve."""
