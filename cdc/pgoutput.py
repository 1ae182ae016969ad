"""Decode PostgreSQL's built-in ``pgoutput`` logical replication messages (protocol 1).

Only what triggerless capture (``cdc.logical``) reads: Begin, Commit, Relation, Insert,
Update, Delete and logical decoding messages. Others (Origin, Type, Truncate) come back as
:class:`Other`. Column values are PostgreSQL's text form, as ``pgoutput`` sends them
without ``binary``; :data:`UNCHANGED` marks a TOASTed value an UPDATE left as it was.

Format: "Logical Replication Message Formats" in the PostgreSQL manual. Integers are
big-endian; strings end with a zero byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

#: PostgreSQL's timestamp epoch; timestamps are microseconds since then.
PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)


class _Unchanged:
    """An UPDATE's unchanged TOASTed value: pgoutput does not send it again."""

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()
Value = str | None | _Unchanged


class ProtocolError(ValueError):
    """Bytes that are not a pgoutput protocol 1 message we understand."""


@dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True)
class Relation:
    relid: int
    namespace: str
    name: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Change:
    """A row change; ``new`` for INSERT and UPDATE, ``old`` (key or whole row) otherwise."""

    op: Literal["insert", "update", "delete"]
    relid: int
    new: tuple[Value, ...] | None
    old: tuple[Value, ...] | None


@dataclass(frozen=True)
class Message:
    """``pg_logical_emit_message``: inside its transaction when ``transactional``."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True)
class Other:
    kind: str


Decoded = Begin | Commit | Relation | Change | Message | Other


_STRUCTS: dict[str, struct.Struct] = {}


class _Reader:
    """A cursor over one message. Hot: a drain parses every write's message."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, fmt: str) -> int:
        unpacker = _STRUCTS.get(fmt)
        if unpacker is None:
            unpacker = _STRUCTS[fmt] = struct.Struct(fmt)
        try:
            (value,) = unpacker.unpack_from(self.data, self.at)
        except struct.error as exc:
            raise ProtocolError(f"message ends early at byte {self.at}") from exc
        self.at += unpacker.size
        return int(value)

    def byte(self) -> str:
        if self.at >= len(self.data):
            raise ProtocolError(f"message ends early at byte {self.at}")
        self.at += 1
        return chr(self.data[self.at - 1])

    def string(self) -> str:
        end = self.data.find(b"\0", self.at)
        if end < 0:
            raise ProtocolError(f"unterminated string at byte {self.at}")
        text = self.data[self.at : end].decode()
        self.at = end + 1
        return text

    def raw(self, length: int) -> bytes:
        if self.at + length > len(self.data):
            raise ProtocolError(f"value of {length} bytes runs past the message")
        chunk = self.data[self.at : self.at + length]
        self.at += length
        return chunk

    def time(self) -> datetime:
        return PG_EPOCH + timedelta(microseconds=self.take("!q"))

    def tuple(self) -> tuple[Value, ...]:
        values: list[Value] = []
        for _ in range(self.take("!H")):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(UNCHANGED)
            elif kind == "t":
                values.append(self.raw(self.take("!I")).decode())
            else:
                raise ProtocolError(f"column kind {kind!r} (binary mode is not requested)")
        return tuple(values)


def _begin(r: _Reader) -> Begin:
    return Begin(final_lsn=r.take("!Q"), commit_time=r.time(), xid=r.take("!I"))


def _commit(r: _Reader) -> Commit:
    r.take("!B")  # flags, unused
    return Commit(commit_lsn=r.take("!Q"), end_lsn=r.take("!Q"), commit_time=r.time())


def _relation(r: _Reader) -> Relation:
    relid, namespace, name = r.take("!I"), r.string(), r.string()
    r.take("!B")  # replica identity setting
    columns = []
    for _ in range(r.take("!H")):
        r.take("!B")  # flags (part of the key)
        columns.append(r.string())
        r.take("!I")  # type oid
        r.take("!i")  # type modifier
    return Relation(relid=relid, namespace=namespace, name=name, columns=tuple(columns))


def _insert(r: _Reader) -> Change:
    relid = r.take("!I")
    if r.byte() != "N":
        raise ProtocolError("INSERT without its new tuple")
    return Change("insert", relid, new=r.tuple(), old=None)


def _update(r: _Reader) -> Change:
    relid = r.take("!I")
    old = None
    marker = r.byte()
    if marker in ("K", "O"):
        old = r.tuple()
        marker = r.byte()
    if marker != "N":
        raise ProtocolError("UPDATE without its new tuple")
    return Change("update", relid, new=r.tuple(), old=old)


def _delete(r: _Reader) -> Change:
    relid = r.take("!I")
    if r.byte() not in ("K", "O"):
        raise ProtocolError("DELETE without its old key")
    return Change("delete", relid, new=None, old=r.tuple())


def _message(r: _Reader) -> Message:
    transactional = r.take("!B") == 1
    lsn, prefix = r.take("!Q"), r.string()
    return Message(transactional, lsn, prefix, r.raw(r.take("!I")))


_PARSERS: Final[dict[str, Callable[[_Reader], Decoded]]] = {
    "B": _begin,
    "C": _commit,
    "R": _relation,
    "I": _insert,
    "U": _update,
    "D": _delete,
    "M": _message,
}


def parse(data: bytes) -> Decoded:
    """One message, as ``pg_logical_slot_peek_binary_changes`` returns it."""
    r = _Reader(data)
    kind = r.byte()
    parser = _PARSERS.get(kind)
    return parser(r) if parser is not None else Other(kind)


def lsn_text(lsn: int) -> str:
    """``0/16B3748``: how PostgreSQL writes a ``pg_lsn``."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_int(text: str) -> int:
    """The inverse of :func:`lsn_text`."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)
