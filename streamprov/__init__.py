"""streamprov: data provenance and selective recomputation for Apache Kafka pipelines.

Stamp every record with an Avro provenance header (DataID, Lineage, Timestamp, Checksum), record each
step, and recompute only what a change affects.
"""

from streamprov.checksum import Checksum, ChecksumAlgorithm
from streamprov.errors import HeaderError, MalformedHeaderError, StreamprovError, UnknownSchemaError
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.lineage import InputDigest, Lineage, Step, StepKind
from streamprov.registry import FunctionRegistry, RegisteredFunction

__version__ = "0.1.0"

__all__ = [
    "HEADER_KEY",
    "Checksum",
    "ChecksumAlgorithm",
    "FunctionRegistry",
    "HeaderError",
    "InputDigest",
    "Lineage",
    "MalformedHeaderError",
    "ProvenanceHeader",
    "RegisteredFunction",
    "Step",
    "StepKind",
    "StreamprovError",
    "UnknownSchemaError",
    "__version__",
]
