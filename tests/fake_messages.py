"""A stand-in for `confluent_kafka.Message` (which tests cannot construct), shared by unit tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka import TIMESTAMP_CREATE_TIME


@dataclass
class Msg:
    v: bytes | None
    k: bytes | None = b"k"
    h: list[tuple[str, bytes | None]] | None = None
    t: str = "in"
    p: int = 0
    o: int = 0
    ts: tuple[int, int] = field(default_factory=lambda: (TIMESTAMP_CREATE_TIME, 1_000))

    def value(self) -> bytes | None:
        return self.v

    def key(self) -> bytes | None:
        return self.k

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self.h

    def topic(self) -> str:
        return self.t

    def partition(self) -> int:
        return self.p

    def offset(self) -> int:
        return self.o

    def timestamp(self) -> tuple[int, int]:
        return self.ts
