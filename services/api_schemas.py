"""Request and response bodies of the product-images HTTP API (they make the OpenAPI).

Request models are strict and closed (no coercion, no unknown fields); the values are
then checked by the service itself, so the API and direct callers share one validation.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.image_types import ImageView


class ImageOut(BaseModel):
    """One image with all its metadata."""

    id: int = Field(description="product_images id, or a stable negative id before backfill")
    product_id: int
    url: str
    order: int
    is_label: bool
    alt_text: str | None = None
    tags: list[str] = Field(default_factory=list)
    mime_type: str | None = None
    file_size: int | None = None
    width: int | None = None
    height: int | None = None
    created_at: datetime | None = None

    @classmethod
    def of(cls, view: ImageView) -> ImageOut:
        return cls(
            id=view.id, product_id=view.product_id, url=view.url, order=view.order,
            is_label=view.is_label, alt_text=view.alt_text, tags=list(view.tags),
            mime_type=view.mime_type, file_size=view.file_size, width=view.width,
            height=view.height, created_at=view.created_at,
        )  # fmt: skip


class ImageList(BaseModel):
    """A product's images in order, label included (``is_label`` marks it)."""

    tenant: str
    product_id: int
    stage: str = Field(description="the tenant's stage the images were read in")
    images: list[ImageOut]


class NewImageIn(BaseModel):
    """An image to add: an https URL, an allowed mime type, an optional size and metadata."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str
    mime_type: str
    is_label: bool = False
    alt_text: str | None = None
    tags: list[str] | None = None
    file_size: int | None = None
    width: int | None = None
    height: int | None = None

    def data(self) -> dict[str, object]:
        return self.model_dump(exclude_none=True)


class ReorderIn(BaseModel):
    """Every image id of the product, each once, in the new order."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image_ids: list[int]


class LabelIn(BaseModel):
    """Mark (true) or unmark (false) the image as the product's label."""

    model_config = ConfigDict(extra="forbid", strict=True)

    is_label: bool


class PreviewOut(BaseModel):
    """The payload we would send to a marketplace, and the photos left out, with why."""

    marketplace: str
    payload: dict[str, Any]
    skipped: list[tuple[str, str]]


class ErrorOut(BaseModel):
    """Every error: the error type, one readable line, and its fields."""

    error: str
    message: str
    detail: Any = None
