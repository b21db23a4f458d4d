"""OpenAI-style cursor pagination: `limit` items, `has_more`, and `after=<id of the last item>` for the next page.

Keyset pagination on (sort column, id): stable while rows are added, one indexed range scan per page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVarTuple

import sqlalchemy as sa
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.errors import InvalidRequest, NotFound

Ts = TypeVarTuple("Ts")  # a select's column types


class Listed(Protocol):
    """A row of a listed table: paged by (created_at, id)."""

    @property
    def created_at(self) -> datetime: ...

    @property
    def id(self) -> str: ...


def cursor_after(after: str | None, find: Callable[[str], Listed]) -> tuple[datetime, str] | None:
    """The (created_at, id) cursor of `after`, the last item of the previous page, found by `find` (the tenant's
    own lookup, raising NotFound); an unknown id is a 400 on `after`."""
    if after is None:
        return None
    try:
        last = find(after)
    except NotFound as exc:
        raise InvalidRequest(f"after: {exc.message}", param="after") from None
    return last.created_at, last.id


def after_cursor(
    stmt: sa.Select[*Ts], key: InstrumentedAttribute[Any], id_col: InstrumentedAttribute[Any],
    cursor: tuple[Any, str] | None, *, descending: bool,
) -> sa.Select[*Ts]:
    """`stmt` ordered by (key, id) and, with a cursor (key value, id) of the last item seen, past it."""
    if cursor is not None:
        value, last_id = cursor
        if descending:
            stmt = stmt.where(sa.or_(key < value, sa.and_(key == value, id_col < last_id)))
        else:
            stmt = stmt.where(sa.or_(key > value, sa.and_(key == value, id_col > last_id)))
    order = (key.desc(), id_col.desc()) if descending else (key.asc(), id_col.asc())
    return stmt.order_by(*order)


def fetch_page(session: Session, stmt: sa.Select[*Ts], limit: int
               ) -> tuple[Sequence[sa.Row[*Ts]], bool]:
    """(the first `limit` rows of `stmt`, whether there are more): one extra row is read to know."""
    rows = session.execute(stmt.limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit
