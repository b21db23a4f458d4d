"""Recognising our object ids before they reach a query.

An id from a URL or a body that cannot be one of ours (wrong prefix, wrong length, odd characters such as NUL,
which PostgreSQL refuses in a string) is answered exactly like a well-formed id that does not exist.
"""

from __future__ import annotations

import re
from typing import Final

from app.db.session import ID_PREFIXES, ID_RANDOM_CHARS, IdKind

_PATTERNS: Final = {kind: re.compile(re.escape(prefix) + f"[A-Za-z0-9]{{{ID_RANDOM_CHARS}}}")
                    for kind, prefix in ID_PREFIXES.items()}


def is_id(kind: IdKind, value: str) -> bool:
    """Whether `value` has the form of an id of `kind` (see app.db.session.new_id)."""
    return _PATTERNS[kind].fullmatch(value) is not None
