"""The one place where the process environment is read.

Everything else receives an :class:`Environment` (or values taken from it),
so tests can run several proxies with different settings in one process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Environment:
    """A snapshot of the environment variables casf-proxy reads."""

    variables: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_process(cls) -> Environment:
        return cls(dict(os.environ))

    def get(self, name: str) -> str | None:
        value = self.variables.get(name)
        return value if value not in (None, "") else None

    @property
    def config_path(self) -> str | None:
        return self.get("CASF_CONFIG")

    @property
    def redis_url(self) -> str | None:
        return self.get("REDIS_URL")

    @property
    def pg_dsn(self) -> str | None:
        return self.get("PG_DSN")

    @property
    def admin_token(self) -> str | None:
        return self.get("CASF_ADMIN_TOKEN")

    @property
    def log_level(self) -> str:
        return (self.get("CASF_LOG_LEVEL") or "info").lower()

    @property
    def otel_exporter_otlp_endpoint(self) -> str | None:
        """Traces go here when the config has no ``telemetry.otlp_endpoint``."""
        return self.get("OTEL_EXPORTER_OTLP_ENDPOINT")

    @property
    def prometheus_multiproc_dir(self) -> str | None:
        """Set by ``casf-proxy run --workers N`` for its workers (prometheus_client's
        multiprocess mode, which reads the same variable itself)."""
        return self.get("PROMETHEUS_MULTIPROC_DIR")
