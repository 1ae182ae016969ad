"""Typed values the image service works with, and the validation of new images.

Validation raises :class:`cdc.errors.InvalidImageError` naming the field, so the HTTP API
can answer 422 with a precise body and nothing is written.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from cdc.errors import InvalidImageError
from services.heartbeat import Heartbeat

DEFAULT_MIME_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})
MAX_URL_LENGTH = 2048
MAX_ALT_TEXT = 1000
_KNOWN_KEYS = frozenset(
    {"url", "is_label", "alt_text", "tags", "mime_type", "file_size", "width", "height"}
)


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """Limits of the image service, and the heartbeat that reports the stage this
    instance serves each tenant from."""

    max_file_size: int = 10 * 1024 * 1024
    allowed_mime_types: frozenset[str] = DEFAULT_MIME_TYPES
    max_photos: int = 20  # photos per product, labels not counted (Vinted's limit)
    heartbeat: Heartbeat | None = None  # told the stage each transaction reads


@dataclass(frozen=True, kw_only=True)
class ImageView:
    """One image of a product as the service serves it, whatever the stage.

    ``id`` is the ``product_images`` id when the table has the image; in a JSONB stage
    without a matching row it is a stable negative id (see :func:`fallback_id`).
    ``raw`` is the element's canonical JSONB form (JSONB stages only), kept so a
    rewrite preserves keys the service does not know.
    """

    id: int
    product_id: int
    url: str
    order: int
    is_label: bool = False
    alt_text: str | None = None
    tags: tuple[str, ...] = ()
    mime_type: str | None = None
    file_size: int | None = None
    width: int | None = None
    height: int | None = None
    created_at: datetime | None = None
    raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


LABEL_COPY = "a copy of the product's label (same url)"


def label_copies(views: Sequence[ImageView]) -> list[ImageView]:
    """The views that are not flagged ``is_label`` but show the label: its url again.

    One row per product can carry ``is_label`` (a unique index), but a legacy array can
    name the label's url twice (an old client that appended it again). Each copy is the
    same picture, so publishing any copy publishes the label.
    """
    label_urls = _label_urls(views)
    return [v for v in views if not v.is_label and v.url in label_urls]


def without_labels(views: Sequence[ImageView]) -> list[ImageView]:
    """The photos: every view but the label and its copies (:func:`label_copies`)."""
    label_urls = _label_urls(views)
    return [v for v in views if v.url not in label_urls]


def _label_urls(views: Sequence[ImageView]) -> set[str]:
    return {v.url for v in views if v.is_label}


def fallback_id(product_id: int, url: str, rank: int) -> int:
    """A stable id for a JSONB element that has no ``product_images`` row yet.

    Negative, so it never collides with a table id; it encodes the product (so the id
    alone finds it) and a CRC-32 of (url, rank among equal urls), the same key capture
    matches rows by, so it survives reorders and edits of other images.
    """
    if not 0 < product_id < 2**31:
        raise ValueError(f"product id {product_id} is outside the fallback id range")
    crc = zlib.crc32(f"{url}\x00{rank}".encode()) & 0xFFFFFFFF
    return -((product_id << 32) | crc)


def product_of_fallback(image_id: int) -> int:
    """The product id encoded in a fallback id."""
    return (-image_id) >> 32


@dataclass(frozen=True, kw_only=True)
class NewImage:
    """A validated image to add."""

    url: str
    mime_type: str
    is_label: bool = False
    alt_text: str | None = None
    tags: tuple[str, ...] = ()
    file_size: int | None = None
    width: int | None = None
    height: int | None = None


def validate_url(url: object) -> str:
    """An absolute https URL with a host; ``javascript:``, ``data:``, ``http:`` are refused."""
    if not isinstance(url, str) or not url:
        raise InvalidImageError(field="url", value=url, why="a non-empty string is required")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidImageError(field="url", value=url, why=f"longer than {MAX_URL_LENGTH}")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidImageError(field="url", value=url, why="contains whitespace or controls")
    parts = urlsplit(url)
    if parts.scheme.lower() != "https":
        raise InvalidImageError(field="url", value=url, why="only https URLs are accepted")
    if not parts.hostname:
        raise InvalidImageError(field="url", value=url, why="the URL has no host")
    return url


def _opt_int(
    data: Mapping[str, object], key: str, *, minimum: int, maximum: int = 2**31 - 1
) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        why = f"an integer from {minimum} to {maximum} is required"
        raise InvalidImageError(field=key, value=value, why=why)
    return value


def _tags(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
        raise InvalidImageError(field="tags", value=value, why="a list of strings is required")
    return tuple(value)


def validate_new_image(data: Mapping[str, object], settings: ServiceSettings) -> NewImage:
    """Check every field of ``data``; raise on the first bad one."""
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        raise InvalidImageError(field=unknown[0], value=data[unknown[0]], why="unknown field")
    mime = data.get("mime_type")
    if not isinstance(mime, str) or mime not in settings.allowed_mime_types:
        allowed = ", ".join(sorted(settings.allowed_mime_types))
        raise InvalidImageError(field="mime_type", value=mime, why=f"allowed: {allowed}")
    size = _opt_int(data, "file_size", minimum=0, maximum=2**63 - 1)
    if size is not None and size > settings.max_file_size:
        why = f"larger than the maximum of {settings.max_file_size} bytes"
        raise InvalidImageError(field="file_size", value=size, why=why)
    alt = data.get("alt_text")
    if alt is not None and (not isinstance(alt, str) or len(alt) > MAX_ALT_TEXT):
        why = f"a string of at most {MAX_ALT_TEXT} characters is required"
        raise InvalidImageError(field="alt_text", value=alt, why=why)
    label = data.get("is_label", False)
    if not isinstance(label, bool):
        raise InvalidImageError(field="is_label", value=label, why="a boolean is required")
    return NewImage(
        url=validate_url(data.get("url")),
        mime_type=mime,
        is_label=label,
        alt_text=alt,
        tags=_tags(data.get("tags")),
        file_size=size,
        width=_opt_int(data, "width", minimum=1),
        height=_opt_int(data, "height", minimum=1),
    )
