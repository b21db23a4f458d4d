"""Observability: the per-request record, Prometheus metrics and the access-log middleware.

Only `context` is imported by other layers (it is stdlib-only); the rest is wired in `app.main`.
"""
