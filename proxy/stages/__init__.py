"""Pipeline stages, one module each, in the pipeline's order (docs/architecture.md).

A stage is an object with a ``name`` (its config id) and
``async check(exchange) -> Verdict | None``: ``None`` means "continue", a
:class:`~proxy.model.Verdict` stops the pipeline. Stages never forward and
never write audit records; the pipeline does both.
"""

from __future__ import annotations

from typing import Protocol

from proxy.model import Exchange, Verdict


class Stage(Protocol):
    name: str

    async def check(self, ex: Exchange) -> Verdict | None: ...
