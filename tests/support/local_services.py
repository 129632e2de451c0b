"""PostgreSQL and Redis on this machine, as the distributed tier uses them."""

from __future__ import annotations

from dataclasses import dataclass

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


@dataclass(frozen=True)
class Services:
    started_postgres: bool
    started_redis: bool


@dataclass(frozen=True)
class Databases:
    metadata: str
    outbox: str

    @staticmethod
    def url(name: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


@dataclass(frozen=True)
class Broker:
    db: int
    queue: str
    token: str

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.db}"
