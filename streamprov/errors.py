"""One root exception for everything streamprov raises, so callers can catch us precisely.

Errors that come from a Kafka record keep what a dead-letter record needs: the reason and the raw
bytes, so nothing is lost when a record is set aside.
"""

from __future__ import annotations


class StreamprovError(Exception):
    """Root of every error streamprov raises."""


class HeaderError(StreamprovError):
    """A provenance header could not be decoded; `raw` keeps the offending bytes for dead-lettering."""

    def __init__(self, message: str, raw: bytes | None = None) -> None:
        super().__init__(message)
        self.raw = raw


class MalformedHeaderError(HeaderError):
    """The header bytes are not a valid streamprov provenance header."""


class MissingHeaderError(MalformedHeaderError):
    """The record carries no provenance header at all (a subclass of `MalformedHeaderError`, so code
    that treats every unusable header alike keeps working; dead letters tell it apart)."""


class UnknownSchemaError(HeaderError):
    """The header names a schema fingerprint this version of streamprov does not know."""


class RegistryError(StreamprovError):
    """A function was registered or looked up inconsistently."""


class FunctionNotFoundError(RegistryError):
    """No function is registered under the id and version a lineage step names."""


class SerdeError(StreamprovError):
    """A record value could not be (de)serialised."""


class ProcessingError(StreamprovError):
    """A registered function raised while processing a record; the record goes to the dead-letter topic."""
