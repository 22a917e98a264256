"""Which quota ledger: PostgreSQL for a postgresql:// URL, else the SQLite file at a path (or the default).

The place comes from the caller (`zerogpu serve --ledger`), else from
ZEROGPU_LEDGER, else it is the SQLite file under ZEROGPU_DATA_DIR.
"""

from __future__ import annotations

import os

from .. import settings
from .quota import QuotaLedger

URL_SCHEMES = ("postgresql://", "postgres://")


def is_url(where: str | os.PathLike | None) -> bool:
    return isinstance(where, str) and where.startswith(URL_SCHEMES)


def open_ledger(where: str | os.PathLike | None = None, policy=None, **options) -> QuotaLedger:
    """The ledger at `where` (a postgresql:// URL or a file path; None: ZEROGPU_LEDGER or the default file)."""
    where = where if where is not None else settings.ledger()
    if is_url(where):
        from .quota_postgres import PostgresLedger

        return PostgresLedger(where, policy, **options)
    from .quota_sqlite import SQLiteLedger

    return SQLiteLedger(where, policy, **options)
