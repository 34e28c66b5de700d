"""`streamprov ledger ...`: verify a ledger, dump it for offline audit, index and query it, make keys.

A typer sub-app, mounted by `streamprov/cli.py` as `app.add_typer(ledger_app, name="ledger")`.
`verify` exits 0 when the ledger re-derives cleanly, 1 when something is wrong (the first bad entry
is named on stdout), and 2 when it could not check (no key, no broker, unreadable file). `upstream`
and `downstream` exit 1 when the ledger does not have the node or DataID, 2 when they could not look
(no index: `ledger index` builds it; queries never create one).

A ledger is read either from its Kafka topic (`--topic`, `--bootstrap-servers`) or from a dump file
(`--dump`): the records exactly as stored, each as a 4-byte big-endian length and the bytes, so an
auditor can verify a copy offline with nothing but the public key.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streamprov.ledger.codec import encode_record, stored
from streamprov.ledger.errors import LedgerError, LedgerIndexError
from streamprov.ledger.index import LedgerIndex
from streamprov.ledger.model import Checkpoint, DataRef, MalformedRecord, StoredRecord
from streamprov.ledger.queries import Applied
from streamprov.ledger.signing import CheckpointVerifier, load_public_key, public_key_pem
from streamprov.ledger.verify import verify_ledger

ledger_app = typer.Typer(help="The provenance ledger: verify, dump, index, query.", no_args_is_help=True)

EXIT_TAMPERED = 1
EXIT_NOT_FOUND = 1
EXIT_ERROR = 2
_LEN = struct.Struct(">I")

Bootstrap = Annotated[
    str | None,
    typer.Option(
        "--bootstrap-servers", "-b", envvar="STREAMPROV_BOOTSTRAP_SERVERS", help="Kafka bootstrap servers."
    ),
]
Topic = Annotated[
    str | None, typer.Option("--topic", "-t", envvar="STREAMPROV_LEDGER_TOPIC", help="Ledger topic.")
]
Dump = Annotated[Path | None, typer.Option("--dump", help="Read a ledger dump file instead of the topic.")]
LedgerId = Annotated[
    str | None,
    typer.Option("--ledger-id", envvar="STREAMPROV_LEDGER_ID", help="Ledger id (default: the topic name)."),
]
IndexPath = Annotated[Path, typer.Option("--index", "-i", help="Directory of the local RocksDB index.")]


def _stopped_by(exc: Exception) -> str:
    """The error line for what stopped a service's loop: a `LedgerError` says what to check (brokers
    that do not answer, a missing topic, a batch never sealed); anything librdkafka raises otherwise
    is reduced to its error."""
    if isinstance(exc, LedgerError):
        return str(exc)
    from streamprov.agents.kafka_io import kafka_error  # noqa: PLC0415 - keep --help fast

    return f"stopped on a Kafka error: {kafka_error(exc).str()}"  # type: ignore[arg-type]  # a KafkaException


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def open_ledger_index(path: Path, ledger_id: str, *, create: bool, build_hint: str = "") -> LedgerIndex:
    """The index at `path`, or `LedgerIndexError` naming the path and what to do.

    rocksdict raises a bare `Exception` (a file in the way, no permission, the lock held) and creates
    a database wherever it is pointed: a query (`create=False`) must not leave an empty index behind
    to answer "nothing" from, and a build must not fill a directory that holds something else.
    """
    try:
        if path.exists() and not path.is_dir():
            raise LedgerIndexError(f"{path} is a file, not a ledger index directory: pass a directory")
        is_index = (path / "CURRENT").is_file()  # every RocksDB database has one
        if not create and not is_index:
            hint = build_hint or (
                f"build it with `streamprov ledger index -i {path} --topic LEDGER -b HOST:PORT` "
                "(or --dump FILE instead of the topic)"
            )
            raise LedgerIndexError(f"no ledger index at {path}: {hint}")
        if create and not is_index and path.is_dir() and any(path.iterdir()):
            raise LedgerIndexError(
                f"{path} is a directory that is not a ledger index: pass a new or empty directory"
            )
    except OSError as exc:
        raise LedgerIndexError(f"cannot open the ledger index at {path}: {exc.strerror or exc}") from exc
    try:
        return LedgerIndex(path, ledger_id)
    except LedgerError:
        raise
    except Exception as exc:  # rocksdict's errors are bare Exceptions
        raise LedgerIndexError(f"cannot open the ledger index at {path}: {exc}") from exc


def read_dump(path: Path) -> Iterator[StoredRecord]:
    """Records of a dump file, offsets counted from 0."""
    with path.open("rb") as f:
        offset = 0
        while True:  # one record per turn until the end of the file
            head = f.read(_LEN.size)
            if not head:
                return
            if len(head) < _LEN.size:
                yield StoredRecord(offset, MalformedRecord(head, "truncated length at the end of the dump"))
                return
            (n,) = _LEN.unpack(head)
            raw = f.read(n)
            yield (
                stored(offset, raw)
                if len(raw) == n
                else StoredRecord(offset, MalformedRecord(raw, "truncated record at the end of the dump"))
            )
            offset += 1


def write_dump(path: Path, records: Iterable[StoredRecord]) -> int:
    """Write `records` to `path` as a dump; returns how many.

    They go to a temporary file next to `path`, renamed over it only once all are written and synced:
    a dump that fails (a missing topic, a broker gone mid-read) never erases or half-replaces a good
    one. Raises `OSError` when the file cannot be written.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    count = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for item in records:
                rec = item.record
                raw = rec.raw if isinstance(rec, MalformedRecord) else encode_record(rec)
                f.write(_LEN.pack(len(raw)) + raw)
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def check_ledger_topic(bootstrap: str, topic: str, *, option: str, timeout_s: float = 10.0) -> None:
    """Raise `LedgerError` unless `topic` exists: reading a missing topic fails with librdkafka's
    `_UNKNOWN_PARTITION`, which does not say the topic is not there. Lists every topic (a metadata
    request naming the topic may create it on a broker with `auto.create.topics.enable`)."""
    from confluent_kafka import KafkaException  # noqa: PLC0415 - keep --help fast

    from streamprov.agents.kafka_io import kafka_error, list_all_topics  # noqa: PLC0415
    from streamprov.ledger.kafka import client_config  # noqa: PLC0415

    try:
        topics = list_all_topics(client_config(bootstrap), timeout_s)
    except KafkaException as exc:
        raise LedgerError(
            f"cannot list the topics on {bootstrap} ({kafka_error(exc).str()}): check "
            "--bootstrap-servers and that the brokers are reachable from here"
        ) from exc
    if topic not in topics:
        raise LedgerError(f"topic {topic} does not exist on {bootstrap}: check {option}")


def _reader(
    topic: str | None, bootstrap: str | None, dump: Path | None
) -> Callable[[int], Iterator[StoredRecord]]:
    """Records from a start offset, of the dump or the topic; checked to exist before anything is
    opened or written (an index created, a dump begun) for a ledger that is not there."""
    if dump is not None:
        if not dump.is_file():
            _fail(f"no dump file {dump}")
        return lambda start: (r for r in read_dump(dump) if r.offset >= start)
    if not topic or not bootstrap:
        _fail("name the ledger: --dump FILE, or --topic and --bootstrap-servers")
    try:
        check_ledger_topic(bootstrap, topic, option="--topic")
    except LedgerError as exc:
        _fail(str(exc))
    from streamprov.ledger.kafka import KafkaLedgerReader  # noqa: PLC0415 - keep --help fast

    return KafkaLedgerReader(bootstrap, topic).read


def _source(
    topic: str | None, bootstrap: str | None, dump: Path | None, start: int = 0
) -> Iterator[StoredRecord]:
    return _reader(topic, bootstrap, dump)(start)


def _ledger_id(ledger_id: str | None, topic: str | None) -> str:
    value = ledger_id or topic
    if not value:
        _fail("which ledger? pass --ledger-id (it defaults to the topic name)")
    return value


@ledger_app.command()
def verify(
    topic: Topic = None,
    bootstrap_servers: Bootstrap = None,
    dump: Dump = None,
    ledger_id: LedgerId = None,
    public_key: Annotated[
        list[str] | None,
        typer.Option(
            "--public-key",
            "-k",
            help="Trusted Ed25519 public key: PEM file, or raw 32 bytes (hex/base64). Repeatable.",
        ),
    ] = None,
    no_signatures: Annotated[
        bool, typer.Option("--no-signatures", help="Check hashes and links only (not recommended).")
    ] = False,
    trusted: Annotated[
        list[Path] | None,
        typer.Option(
            help="A checkpoint seen earlier (JSON from `ledger checkpoint`): the ledger must contain it."
        ),
    ] = None,
    require_signed: Annotated[
        bool, typer.Option(help="Entries after the last checkpoint are a failure (a stopped ledger).")
    ] = False,
) -> None:
    """Re-derive every hash, link, sequence number, Merkle root and signature; name the first bad entry."""
    keys = list(public_key or [])
    env_key = os.environ.get("STREAMPROV_LEDGER_PUBLIC_KEY", "").strip()
    if env_key:
        keys.append(env_key)
    if not keys and not no_signatures:
        _fail("no public key: pass --public-key (or set STREAMPROV_LEDGER_PUBLIC_KEY), or --no-signatures")
    try:
        verifier = None if no_signatures else CheckpointVerifier([load_public_key(_key_arg(k)) for k in keys])
        checkpoints = [_read_checkpoint_json(p) for p in trusted or []]
        report = verify_ledger(
            _source(topic, bootstrap_servers, dump),
            _ledger_id(ledger_id, topic),
            verifier,
            trusted=checkpoints,
            require_signed=require_signed,
        )
    except LedgerError as exc:
        _fail(str(exc))
    typer.echo(report.describe())
    if not report.ok:
        raise typer.Exit(EXIT_TAMPERED)


def _key_arg(value: str) -> str | Path:
    return Path(value) if Path(value).is_file() else value


@ledger_app.command()
def dump(
    out: Annotated[Path, typer.Argument(help="File to write.")],
    topic: Topic = None,
    bootstrap_servers: Bootstrap = None,
) -> None:
    """Copy the ledger topic, record for record, into a file for offline verification.

    An existing OUT is replaced only by a complete dump (a failed one leaves it as it was).
    """
    if out.is_dir():
        _fail(f"{out} is a directory: name the dump file to write")
    if not out.parent.is_dir():
        _fail(f"cannot write {out}: there is no directory {out.parent}")
    try:
        n = write_dump(out, _source(topic, bootstrap_servers, None))
    except LedgerError as exc:
        _fail(f"{exc} (nothing written to {out})")
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror or exc}")
    typer.echo(f"{n} records written to {out}")


@ledger_app.command()
def index(
    index_path: IndexPath,
    topic: Topic = None,
    bootstrap_servers: Bootstrap = None,
    dump: Dump = None,
    ledger_id: LedgerId = None,
) -> None:
    """Build or catch up the local index from where it stopped."""
    lid = _ledger_id(ledger_id, topic)
    read = _reader(topic, bootstrap_servers, dump)
    try:
        with open_ledger_index(index_path, lid, create=True) as idx:
            applied = idx.apply(read(idx.next_offset))
            typer.echo(f"{applied} records applied; {idx.size} entries, {idx.checkpoint_count} checkpoints")
    except LedgerError as exc:
        _fail(str(exc))


def _node_arg(value: str) -> DataRef | str:
    """`DATAID` or `DATAID@crc32c:<hex>` / `DATAID@sha256:<hex>` (as the ledger prints nodes)."""
    from streamprov.export.cli import TargetError, parse_target  # noqa: PLC0415 - keep --help fast

    try:
        return parse_target(value)
    except TargetError as exc:
        _fail(str(exc))


def _print(applied: tuple[Applied, ...], as_json: bool) -> None:
    for a in applied:
        e = a.entry
        if as_json:
            line = {
                "seq": e.seq,
                "depth": a.depth,
                "entry_id": e.entry_id.hex(),
                "application": e.application.describe(),
            }
            typer.echo(json.dumps(line, ensure_ascii=False))
        else:
            typer.echo(f"{e.seq:>10}  depth {a.depth:<3} {e.application.describe()}")


@ledger_app.command()
def downstream(
    node: Annotated[str, typer.Argument(help="DATAID (its source versions) or DATAID@crc32c:<hex>.")],
    index_path: IndexPath,
    ledger_id: Annotated[str, typer.Option("--ledger-id", envvar="STREAMPROV_LEDGER_ID")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Everything derived from a data node or DataID, in dependency order (impact analysis)."""
    start = _node_arg(node)
    with _query_index(index_path, ledger_id) as idx:
        _require_known(idx, start, node)
        result = idx.downstream(start)
        _print(result.applications, as_json)


@ledger_app.command()
def upstream(
    node: Annotated[str, typer.Argument(help="DATAID@crc32c:<hex> of an output.")],
    index_path: IndexPath,
    ledger_id: Annotated[str, typer.Option("--ledger-id", envvar="STREAMPROV_LEDGER_ID")],
    max_depth: Annotated[int | None, typer.Option(min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Lineage of an output back to its sources, oldest first."""
    target = _node_arg(node)
    if isinstance(target, str):
        _fail("upstream needs an exact node: DATAID@crc32c:<hex>")
    with _query_index(index_path, ledger_id) as idx:
        _require_known(idx, target, node)
        _print(idx.upstream(target, max_depth=max_depth).applications, as_json)


def _query_index(index_path: Path, ledger_id: str) -> LedgerIndex:
    try:
        return open_ledger_index(index_path, ledger_id, create=False)
    except LedgerError as exc:
        _fail(str(exc))


def _require_known(idx: LedgerIndex, start: DataRef | str, text: str) -> None:
    """Exit 1 when the index has no such node or DataID: an empty answer would read as "nothing"."""
    from streamprov.export.cli import in_ledger  # noqa: PLC0415 - keep --help fast

    if not (in_ledger(idx, start) if isinstance(start, DataRef) else idx.versions(start)):
        _fail(f"{text} is not in the ledger (the index at {idx.path} has {idx.size} entries)", EXIT_NOT_FOUND)


@ledger_app.command()
def checkpoint(
    index_path: IndexPath,
    ledger_id: Annotated[str, typer.Option("--ledger-id", envvar="STREAMPROV_LEDGER_ID")],
    number: Annotated[int | None, typer.Option(help="Default: the latest.")] = None,
) -> None:
    """Print a checkpoint as JSON (keep it: `verify --trusted` proves the ledger still contains it)."""
    with _query_index(index_path, ledger_id) as idx:
        try:
            cp = idx.latest_checkpoint() if number is None else idx.checkpoint(number)
        except LedgerIndexError as exc:  # no such number
            _fail(str(exc))
    if cp is None:
        _fail("no checkpoint yet")
    typer.echo(json.dumps(checkpoint_json(cp), indent=2))


def checkpoint_json(cp: Checkpoint) -> dict[str, object]:
    return {
        "ledger_id": cp.ledger_id,
        "number": cp.number,
        "tree_size": cp.tree_size,
        "root_hash": cp.root_hash.hex(),
        "head_hash": cp.head_hash.hex(),
        "frontier": [h.hex() for h in cp.frontier],
        "timestamp_ms": cp.timestamp_ms,
        "key_id": cp.key_id.hex(),
        "signature": cp.signature.hex(),
    }


def _read_checkpoint_json(path: Path) -> Checkpoint:
    try:
        d = json.loads(path.read_text("utf-8"))
        return Checkpoint(
            d["ledger_id"],
            int(d["number"]),
            int(d["tree_size"]),
            bytes.fromhex(d["root_hash"]),
            bytes.fromhex(d["head_hash"]),
            tuple(bytes.fromhex(h) for h in d["frontier"]),
            int(d["timestamp_ms"]),
            bytes.fromhex(d["key_id"]),
            bytes.fromhex(d["signature"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _fail(f"{path} is not a checkpoint JSON: {exc}")


@ledger_app.command()
def keygen(
    out: Annotated[Path, typer.Argument(help="Private key PEM to write; the public key goes to OUT.pub.")],
) -> None:
    """Make an Ed25519 checkpoint signing key (private PEM, mode 0600) and its public key."""
    if out.exists():
        _fail(f"{out} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = out.with_name(out.name + ".pub")
    pub.write_bytes(public_key_pem(key.public_key()))
    typer.echo(f"private key: {out}\npublic key:  {pub}")


@ledger_app.command()
def sequencer(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="streamprov.yaml: Kafka settings, streams.ledger / ledger_requests / dead_letters, "
            "ledger.id, ledger.checkpoint_key and ledger.sequencer. Options below override it.",
        ),
    ] = None,
    bootstrap: Bootstrap = None,
    topic: Topic = None,
    requests_topic: Annotated[
        str | None,
        typer.Option(
            "--requests-topic",
            envvar="STREAMPROV_LEDGER_REQUESTS_TOPIC",
            help="Topic the clients send applications to (one partition). Default: <ledger topic>.requests.",
        ),
    ] = None,
    ledger_id: LedgerId = None,
    signing_key: Annotated[
        Path | None,
        typer.Option(
            "--signing-key",
            help="Ed25519 private key PEM for checkpoints (default: ledger.checkpoint_key of --config, "
            "else $STREAMPROV_LEDGER_SIGNING_KEY_FILE or $STREAMPROV_LEDGER_SIGNING_KEY).",
        ),
    ] = None,
    unsigned: Annotated[
        bool,
        typer.Option("--unsigned", help="No signing key: no checkpoints (the chain alone is not proof)."),
    ] = False,
    dead_letter_topic: Annotated[
        str | None,
        typer.Option(
            "--dead-letter-topic",
            help="Where undecodable or misaddressed requests go. Default: streams.dead_letters.",
        ),
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(min=1, help="Sign a checkpoint every N entries (default 1000).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Requests per transaction, at most (default 500).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address the health endpoints bind to.")] = "0.0.0.0",  # noqa: S104
    http_port: Annotated[
        int | None,
        typer.Option(help="/healthz and /readyz (0: any free port). Default: ledger.sequencer.http_port."),
    ] = None,
    idle_exit: Annotated[
        float | None, typer.Option("--idle-exit", help="Stop after this many seconds without requests.")
    ] = None,
) -> None:
    """Run the shared ledger sequencer: chain applications from many processes into one ledger.

    Agents and recompute workers on several machines send applications (KafkaLedgerClient) to the
    requests topic; this service seals them into the ledger topic exactly once, one transaction per
    batch. Run two for a hot standby: only the one owning the requests partition seals. SIGTERM stops
    it after the current batch and signs a final checkpoint (during start-up: at once). Exits 2 when
    it cannot start (brokers that do not answer, missing topics) or a batch cannot be sealed.
    """
    import logging  # noqa: PLC0415 - keep --help fast

    from confluent_kafka import KafkaException  # noqa: PLC0415

    from streamprov.agents.lifecycle import install_stop_signals  # noqa: PLC0415
    from streamprov.config import ConfigError, load_config  # noqa: PLC0415
    from streamprov.ledger.config import LedgerConfig, checkpoint_signer  # noqa: PLC0415
    from streamprov.ledger.sequencer import LedgerSequencer  # noqa: PLC0415
    from streamprov.ledger.signing import CheckpointSigner  # noqa: PLC0415

    kafka: dict[str, object] = {}
    signer: CheckpointSigner | None = None
    every, batch, port, group_id = 1000, 500, None, None  # without --config: the built-in defaults
    if config is not None:
        try:
            loaded = load_config(config)
            lc = LedgerConfig.of(loaded)
            if not unsigned and signing_key is None:
                signer = checkpoint_signer(loaded)
        except (ConfigError, LedgerError) as exc:
            _fail(str(exc))
        kafka = dict(lc.kafka)
        topic = topic or lc.ledger_topic
        requests_topic = requests_topic or lc.requests_topic
        dead_letter_topic = dead_letter_topic or lc.dead_letter_topic
        ledger_id = ledger_id or lc.ledger_id
        settings = loaded.ledger.sequencer
        every, batch, port, group_id = (
            settings.checkpoint_every,
            settings.batch_size,
            settings.http_port,
            settings.group_id,
        )
    if bootstrap:
        kafka["bootstrap.servers"] = bootstrap
    if not topic or "bootstrap.servers" not in kafka:
        _fail("name the ledger: --config FILE, or --topic and --bootstrap-servers")
    lid = _ledger_id(ledger_id, topic)
    if not unsigned and signer is None:
        try:
            signer = CheckpointSigner.from_env(signing_key)
        except LedgerError as exc:
            _fail(f"{exc} (or set ledger.checkpoint_key, or pass --unsigned to run without checkpoints)")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        seq = LedgerSequencer(
            kafka,
            requests_topic=requests_topic or f"{topic}.requests",
            ledger_topic=topic,
            ledger_id=lid,
            signer=signer,
            dead_letter_topic=dead_letter_topic or "streamprov.dead-letters",
            group_id=group_id,
            checkpoint_every=checkpoint_every or every,
            batch_size=batch_size or batch,
            http_host=host,
            http_port=http_port if http_port is not None else port,
        )
    except KafkaException as exc:  # bad librdkafka settings: say so, exit 2
        _fail(f"cannot start the sequencer: {exc}")
    install_stop_signals(seq.stop)
    with seq:
        try:
            stats = seq.run(idle_timeout_s=idle_exit)
        except (LedgerError, KafkaException) as exc:  # a line saying what to check, not a traceback
            _fail(_stopped_by(exc))
    typer.echo(
        f"sealed {stats.entries} entries and {stats.checkpoints} checkpoints from {stats.requests} "
        f"requests ({stats.duplicates} duplicates, {stats.dead_letters} dead letters)"
    )
