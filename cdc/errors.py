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


# --- Cutover flag (issue 5) ---------------------------------------------------------


@dataclass(eq=False)
class GuardRefusedError(ImgmigError):
    """A stage change that a guard (or a skipped stage) forbids without ``--force``."""

    tenant: str
    current: str
    target: str
    reasons: tuple[str, ...]
    exit_code: int = 8

    def message(self) -> str:
        return (
            f"refusing {self.current} -> {self.target} for tenant {self.tenant!r}: "
            f"{'; '.join(self.reasons)} (pass --force with a --reason to override)"
        )


@dataclass(eq=False)
class ReasonRequiredError(ImgmigError):
    """A stage change without a reason: every change is audited with one."""

    action: str
    exit_code: int = 4

    def message(self) -> str:
        return f"{self.action}: a non-empty --reason is required (it goes to the audit log)"


@dataclass(eq=False)
class KillSwitchIncompleteError(ImgmigError):
    """The kill switch could not move some tenants (the others were moved)."""

    tenants: tuple[str, ...]
    exit_code: int = 9

    def message(self) -> str:
        return (
            f"kill switch incomplete: {', '.join(self.tenants)} not moved (see above); run it again"
        )


# --- ProductImageService and its HTTP API (issue 5) ------------------------------------


class ImageServiceError(ImgmigError):
    """Base of the errors a caller of ProductImageService can cause with bad input."""

    exit_code: int = 4


@dataclass(eq=False)
class ProductNotFoundError(ImageServiceError):
    """No product with this id in the tenant."""

    tenant: str
    product_id: int

    def message(self) -> str:
        return f"product {self.product_id} not found in tenant {self.tenant!r}"


@dataclass(eq=False)
class ImageNotFoundError(ImageServiceError):
    """No image with this id in the tenant (or not in the given product)."""

    tenant: str
    image_id: int
    product_id: int | None = None

    def message(self) -> str:
        where = f" of product {self.product_id}" if self.product_id is not None else ""
        return f"image {self.image_id}{where} not found in tenant {self.tenant!r}"


@dataclass(eq=False)
class InvalidImageError(ImageServiceError):
    """An image field that fails validation (URL scheme, mime type, size, type)."""

    field: str
    value: object
    why: str

    def message(self) -> str:
        shown = repr(self.value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return f"invalid image {self.field} {shown}: {self.why}"


@dataclass(eq=False)
class PhotoLimitError(ImageServiceError):
    """Adding a photo would exceed the per-product photo limit."""

    tenant: str
    product_id: int
    limit: int

    def message(self) -> str:
        return f"product {self.product_id} already has the maximum of {self.limit} photos"


@dataclass(eq=False)
class NotAPermutationError(ImageServiceError):
    """A reorder whose ids are not exactly the product's image ids, each once."""

    product_id: int
    expected: tuple[int, ...]
    given: tuple[int, ...]

    def message(self) -> str:
        return (
            f"new order for product {self.product_id} must be a permutation of its image ids "
            f"{sorted(self.expected)}, got {list(self.given)}"
        )


@dataclass(eq=False)
class StageChangedError(ImageServiceError):
    """The tenant's stage moved while a transaction relied on it: retry.

    The service holds the stage row under ``FOR KEY SHARE`` for the whole transaction, so
    a stage change waits for it. Only a caller that rolled back a savepoint in which that
    lock was taken lets the change through; what the transaction did may then have
    assumed the old stage, so it must not commit. A reconcile repair chunk checks the
    stage its verify ran under the same way (its earlier chunks were done under it).
    """

    tenant: str
    was: str
    now: str

    def message(self) -> str:
        return (
            f"tenant {self.tenant!r} moved from stage {self.was!r} to {self.now!r} while "
            "this transaction ran; it is rolled back: retry"
        )


@dataclass(eq=False)
class LabelConflictError(ImageServiceError):
    """Marking a second label on a product that already has one."""

    tenant: str
    product_id: int
    label_image_id: int

    def message(self) -> str:
        return (
            f"product {self.product_id} already has a label (image {self.label_image_id}); "
            "unset it first: at most one label per product"
        )


@dataclass(eq=False)
class MalformedImagesError(ImageServiceError):
    """The product's JSONB images value is not an array: rewriting it could lose data."""

    tenant: str
    product_id: int
    kind: str

    def message(self) -> str:
        return (
            f"product {self.product_id} has images of JSON type {self.kind}, not an array; "
            "repair it before editing (the original is kept in the event log)"
        )


@dataclass(eq=False)
class InvalidApiKeyError(ImgmigError):
    """A request without an API key, or with one we do not know."""

    exit_code: int = 4

    def message(self) -> str:
        return "missing or unknown API key (send it in the X-API-Key header)"


@dataclass(eq=False)
class TenantForbiddenError(ImgmigError):
    """An API key used for a tenant other than its own."""

    key_tenant: str
    tenant: str
    exit_code: int = 4

    def message(self) -> str:
        return f"this API key is not valid for tenant {self.tenant!r}"


@dataclass(eq=False)
class ContractRefusedError(ImgmigError):
    """The contract (or an archive restore) is not safe for this tenant yet."""

    tenant: str
    reasons: tuple[str, ...]
    action: str = "contract"
    exit_code: int = 7

    def message(self) -> str:
        return f"refusing to {self.action} tenant {self.tenant!r}: " + "; ".join(self.reasons)


@dataclass(eq=False)
class DeployStoppedError(ImgmigError):
    """A deploy step cannot go on now; rerunning `imgmig deploy run` resumes from here."""

    tenant: str
    step: str
    why: str
    exit_code: int = 2

    def message(self) -> str:
        return (
            f"deploy stopped at step {self.step!r} for {self.tenant}: {self.why} "
            "(fix it, then rerun `imgmig deploy run` to resume)"
        )


# --- Label evidence and review (label_evidence, label_review) ------------------------


@dataclass(eq=False)
class EvidenceSourceError(ImgmigError):
    """Label evidence cannot be read: missing legacy table, or a bad CSV row."""

    source: str
    reason: str
    exit_code: int = 4

    def message(self) -> str:
        return f"cannot import label evidence from {self.source}: {self.reason}"


@dataclass(eq=False)
class ReviewFileError(ImgmigError):
    """A review file that cannot be applied: unknown format, missing column, bad value."""

    path: str
    reason: str
    exit_code: int = 4

    def message(self) -> str:
        return f"cannot apply review file {self.path}: {self.reason}"


@dataclass(eq=False)
class ConflictingOptionsError(ImgmigError):
    """Options that exclude each other (exit 4, not click's 2, which means drift left)."""

    action: str
    options: tuple[str, ...]
    exit_code: int = 4

    def message(self) -> str:
        return f"{self.action}: {' and '.join(self.options)} exclude each other"


# --- Triggerless capture (cdc.logical) ---------------------------------------------------


@dataclass(eq=False)
class LogicalCaptureError(ImgmigError):
    """Logical capture cannot start or go on: server settings, privileges, a lost slot."""

    reason: str
    tenant: str | None = None
    exit_code: int = 7

    def message(self) -> str:
        who = f" for tenant {self.tenant!r}" if self.tenant else ""
        return f"logical capture{who}: {self.reason}"
