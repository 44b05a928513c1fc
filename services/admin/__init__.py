"""The admin service: group operations (scale, rolling upgrade, substitution)."""
