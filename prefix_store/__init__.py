"""Persistence and cache tiers of prefixes: codec, object stores, Redis tier, device pool, resolver."""
