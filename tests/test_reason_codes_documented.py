"""Every reason code the product can answer is defined for users in docs/reason-codes.md."""

from __future__ import annotations

from pathlib import Path

from proxy.reasons import Reason

DOC = Path(__file__).resolve().parent.parent / "docs" / "reason-codes.md"


def test_every_reason_code_is_in_the_reference() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = [r.value for r in Reason if f"`{r.value}`" not in text]
    assert missing == [], f"not documented in docs/reason-codes.md: {missing}"
