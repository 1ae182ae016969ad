"""One error hierarchy for imgmig.

Every error carries fields, not only text, and a documented process exit code. The CLI
prints ``str(error)`` as one line; a traceback appears only with ``--debug``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ImgmigError(Exception):
    """Base of every error imgmig raises on purpose."""

    exit_code: int = 3

    def __str__(self) -> str:
        return self.message()

    def message(self) -> str:
        return self.__class__.__name__


@dataclass(eq=False)
class DatabaseUnreachableError(ImgmigError):
    """No PostgreSQL answered at the URL we were given."""

    url: str
    reason: str
    exit_code: int = 3

    def message(self) -> str:
        return f"cannot reach PostgreSQL at {self.url}: {self.reason}"


@dataclass(eq=False)
class UnknownTenantError(ImgmigError):
    """The tenant does not exist as a schema with a products table."""

    tenant: str
    known: tuple[str, ...] = ()
    exit_code: int = 4

    def message(self) -> str:
        known = ", ".join(self.known) or "none"
        return f"unknown tenant {self.tenant!r} (known tenants: {known})"


@dataclass(eq=False)
class InvalidTenantNameError(ImgmigError):
    """A tenant name that does not match the tenant naming pattern."""

    tenant: str
    exit_code: int = 4

    def message(self) -> str:
        return f"invalid tenant name {self.tenant!r}: expected user_<number> or template_tenant"


@dataclass(eq=False)
class Blocker:
    """A lock held by another backend that stopped a DDL statement."""

    pid: int
    mode: str
    relation: str
    state: str
    query: str

    def describe(self) -> str:
        query = " ".join(self.query.split())[:80]
        return f"pid {self.pid} holds {self.mode} on {self.relation} ({self.state}: {query!r})"


@dataclass(eq=False)
class LockTimeoutExceededError(ImgmigError):
    """A DDL statement could not take its lock within the bounded retries."""

    statement: str
    attempts: int
    lock_timeout_ms: int
    blockers: list[Blocker] = field(default_factory=list)
    exit_code: int = 5

    def message(self) -> str:
        who = "; ".join(b.describe() for b in self.blockers) or "blocker already gone"
        stmt = " ".join(self.statement.split())[:100]
        return (
            f"gave up after {self.attempts} attempts with lock_timeout "
            f"{self.lock_timeout_ms} ms on {stmt!r}; blocked by: {who}"
        )


@dataclass(eq=False)
class SeedExistsError(ImgmigError):
    """Seeding would overwrite tenant schemas that already exist."""

    tenants: tuple[str, ...]
    exit_code: int = 6

    def message(self) -> str:
        return (
            f"tenant schemas already exist ({', '.join(self.tenants)}); "
            "pass --reset to drop and reseed them"
        )


@dataclass(eq=False)
class InvalidStageError(ImgmigError):
    """A stage name outside the lifecycle."""

    stage: str
    exit_code: int = 4

    def message(self) -> str:
        return (
            f"unknown stage {self.stage!r}; "
            "stages are jsonb, dual_write, shadow_read, table, contracted"
        )


@dataclass(eq=False)
class NotMigratedError(ImgmigError):
    """The expand migration has not run for this tenant yet."""

    tenant: str
    exit_code: int = 4

    def message(self) -> str:
        return (
            f"tenant {self.tenant!r} has no imgmig control row; run "
            "`alembic upgrade head` (or `imgmig migrate upgrade`) first"
        )


@dataclass(eq=False)
class StageRefusedError(ImgmigError):
    """An operation that the tenant's current stage does not allow."""

    tenant: str
    stage: str
    action: str
    why: str
    exit_code: int = 7

    def message(self) -> str:
        return (
            f"refusing to {self.action} for tenant {self.tenant!r} "
            f"at stage {self.stage!r}: {self.why}"
        )


@dataclass(eq=False)
class TenantBusyError(ImgmigError):
    """Another backfill or reconcile run holds the tenant's advisory lock."""

    tenant: str
    action: str
    holder: str = "another session"
    # EX_TEMPFAIL (sysexits.h): "try again later", distinct from cron's 0-3.
    exit_code: int = 75

    def message(self) -> str:
        return (
            f"not starting {self.action}: tenant {self.tenant!r} is busy with another imgmig "
            f"run ({self.holder}); exiting so runs never overlap"
        )


@dataclass(eq=False)
class UnknownLabelStrategyError(ImgmigError):
    """A label strategy name that is not registered."""

    name: str
    known: tuple[str, ...] = ()
    exit_code: int = 4

    def message(self) -> str:
        return f"unknown label strategy {self.name!r} (known: {', '.join(self.known)})"


@dataclass(eq=False)
class NoTenantChosenError(ImgmigError):
    """A command that acts on tenants was given neither ``--tenant`` nor ``--all``."""

    action: str
    exit_code: int = 4

    def message(self) -> str:
        return f"{self.action}: pass --tenant T (repeatable) or --all"
