"""The product-images HTTP API (FastAPI), served by ``imgmig serve``.

* The tenant comes from the API key (``X-API-Key``, stored hashed in
  ``imgmig.api_keys``); the tenant in the path must be the key's own, else 403 and
  nothing is read or written.
* Each request is one transaction: the handler builds the service on a fresh session,
  commits when the call succeeds and rolls back when it raises (the service never commits).
* Errors answer 401/403/404/409/422 with ``{"error", "message", "detail"}``.
* OpenAPI at ``/openapi.json``, docs at ``/docs``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any, Literal

import psycopg
from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text

from cdc import errors
from services import api_keys
from services.api_schemas import (
    ErrorOut,
    ImageList,
    ImageOut,
    LabelIn,
    NewImageIn,
    PreviewOut,
    ReorderIn,
)
from services.converters import EbayProductConversionService, VintedProductConverter
from services.db import make_engine, tenant_session
from services.heartbeat import Heartbeat
from services.image_service import ProductImageService
from services.image_types import ServiceSettings

STATUS: dict[type[errors.ImgmigError], int] = {
    errors.InvalidApiKeyError: 401,
    errors.TenantForbiddenError: 403,
    errors.ProductNotFoundError: 404,
    errors.ImageNotFoundError: 404,
    errors.LabelConflictError: 409,
    errors.StageChangedError: 409,
    errors.PhotoLimitError: 409,
    errors.NotMigratedError: 409,
    errors.MalformedImagesError: 409,
    errors.InvalidImageError: 422,
    errors.NotAPermutationError: 422,
}
_KEY = text("SELECT tenant FROM imgmig.api_keys WHERE key_hash = :hash")
PRODUCT = "/v1/tenants/{tenant}/products/{product_id}"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422)
}


class Units:
    """Opens one service per request, in its own transaction."""

    def __init__(self, database_url: str, settings: ServiceSettings) -> None:
        self.database_url = database_url
        self.engine = make_engine(database_url)
        self.settings = settings

    def tenant_of(self, key: str | None) -> str:
        """The tenant an API key belongs to; 401 when there is no such key."""
        if not key:
            raise errors.InvalidApiKeyError()
        with self.engine.connect() as conn:
            tenant = conn.execute(_KEY, {"hash": api_keys.hash_key(key)}).scalar_one_or_none()
        if tenant is None:
            raise errors.InvalidApiKeyError()
        return str(tenant)

    @contextmanager
    def service(self, tenant: str) -> Iterator[ProductImageService]:
        with tenant_session(self.engine, tenant) as session, session.begin():
            yield ProductImageService(session, tenant, settings=self.settings)


def _error(exc: errors.ImgmigError) -> JSONResponse:
    status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)
    fields: dict[str, Any] = dataclasses.asdict(exc) if dataclasses.is_dataclass(exc) else {}
    fields.pop("exit_code", None)
    if isinstance(exc, errors.TenantForbiddenError):
        fields.pop("key_tenant", None)  # never tell a caller whose key it holds
    body = {"error": type(exc).__name__, "message": str(exc), "detail": fields}
    return JSONResponse(jsonable_encoder(body), status_code=status)


def create_app(database_url: str, *, settings: ServiceSettings | None = None) -> FastAPI:
    """The app for one database. Connects at startup (the key table), never at import."""
    units = Units(
        database_url,
        settings or ServiceSettings(heartbeat=Heartbeat(database_url)),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with psycopg.connect(database_url) as conn:
            api_keys.ensure_table(conn)
        yield
        units.engine.dispose()
        if units.settings.heartbeat is not None:
            units.settings.heartbeat.close()

    app = FastAPI(title="imgmig product images", version="1", lifespan=lifespan)
    app.state.units = units

    @app.exception_handler(errors.ImgmigError)
    async def known_error(request: Request, exc: errors.ImgmigError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = {"error": "RequestValidationError", "message": "the request is not valid",
                "detail": exc.errors()}  # fmt: skip
        return JSONResponse(jsonable_encoder(body), status_code=422)

    _routes(app, units)
    return app


def _tenant(
    request: Request, tenant: str, x_api_key: Annotated[str | None, Header()] = None
) -> str:
    """The path's tenant, once the key proves the caller may act for it (401, else 403)."""
    units: Units = request.app.state.units
    owner = units.tenant_of(x_api_key)
    if owner != tenant:
        raise errors.TenantForbiddenError(key_tenant=owner, tenant=tenant)
    return owner


Tenant = Annotated[str, Depends(_tenant)]


def _routes(app: FastAPI, units: Units) -> None:
    def listing(svc: ProductImageService, product_id: int) -> ImageList:
        views = svc.list_images(product_id)
        images = [ImageOut.of(v) for v in views]
        return ImageList(tenant=svc.tenant, product_id=product_id, stage=svc.stage(), images=images)

    def own_image(svc: ProductImageService, product_id: int, image_id: int) -> None:
        if svc.image_product(image_id) != product_id:  # the write then checks it exists
            raise errors.ImageNotFoundError(svc.tenant, image_id, product_id)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(f"{PRODUCT}/images", responses=ERRORS)
    def list_images(tenant: Tenant, product_id: int) -> ImageList:
        """The product's images in order, with all metadata."""
        with units.service(tenant) as svc:
            return listing(svc, product_id)

    @app.post(f"{PRODUCT}/images", status_code=201, responses=ERRORS)
    def add_image(tenant: Tenant, product_id: int, body: NewImageIn) -> ImageOut:
        """Add an image at the end (or as the label)."""
        with units.service(tenant) as svc:
            return ImageOut.of(svc.add_image(product_id, body.data()))

    @app.delete(f"{PRODUCT}/images/{{image_id}}", status_code=204, responses=ERRORS)
    def delete_image(tenant: Tenant, product_id: int, image_id: int) -> Response:
        """Delete an image; the others are renumbered."""
        with units.service(tenant) as svc:
            own_image(svc, product_id, image_id)
            svc.delete_image(image_id)
        return Response(status_code=204)

    @app.put(f"{PRODUCT}/images/order", responses=ERRORS)
    def reorder(tenant: Tenant, product_id: int, body: ReorderIn) -> ImageList:
        """Reorder the images: every id once."""
        with units.service(tenant) as svc:
            svc.reorder_images(product_id, body.image_ids)
            return listing(svc, product_id)

    @app.put(f"{PRODUCT}/images/{{image_id}}/label", responses=ERRORS)
    def set_label(tenant: Tenant, product_id: int, image_id: int, body: LabelIn) -> ImageOut:
        """Mark or unmark the label (at most one per product)."""
        with units.service(tenant) as svc:
            own_image(svc, product_id, image_id)
            return ImageOut.of(svc.set_label_flag(image_id, body.is_label))

    @app.get(f"{PRODUCT}/marketplaces/{{marketplace}}/preview", responses=ERRORS)
    def preview(
        tenant: Tenant, product_id: int, marketplace: Literal["vinted", "ebay"]
    ) -> PreviewOut:
        """The payload this product would be published with; never a label."""
        with units.service(tenant) as svc:
            converter = (
                VintedProductConverter(svc)
                if marketplace == "vinted"
                else EbayProductConversionService(svc)
            )
            result = converter.convert(product_id)
        return PreviewOut(
            marketplace=result.marketplace, payload=result.payload, skipped=list(result.skipped)
        )
