"""Every record of a SQLite audit file, as a reader of the table sees it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.audit.records import FIELDS
from proxy.audit.sqlite import connect, from_row


def all_records(path: Path) -> list[dict[str, Any]]:
    """Ordered by (chain_id, seq); each record with its ``extra`` fields merged in."""
    conn = connect(path, create=False)
    try:
        rows = conn.execute(f"SELECT {', '.join(FIELDS)}, extra FROM audit_events "
                            "ORDER BY chain_id, seq").fetchall()
    finally:
        conn.close()
    return [dict(from_row(r)) for r in rows]
