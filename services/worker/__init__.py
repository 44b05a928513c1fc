"""A role-switchable model worker (prefill or decode, switched at runtime)."""
