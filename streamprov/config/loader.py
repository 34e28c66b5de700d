"""Load `streamprov.yaml`: parse with line numbers, apply `STREAMPROV__A__B` overrides, validate.

Every problem found is collected into one `ConfigError`: where it is (dotted location, file line or
environment variable) and what to write instead. Secrets never appear in a message.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from streamprov.config.errors import ConfigError, ConfigProblem
from streamprov.config.models import CROSS_CHECK_ERROR, Loc, StreamprovConfig, is_secret_key

__all__ = ["ENV_PREFIX", "ENV_SEPARATOR", "env_overrides", "load_config", "loads_config"]

ENV_PREFIX: Final = "STREAMPROV__"
ENV_SEPARATOR: Final = "__"

# Env overrides of one password source replace the file's other sources of the same secret.
_SECRET_GROUPS: Final = (
    ("password", "password_file", "password_env"),
    ("key_password", "key_password_file", "key_password_env"),
    ("secret_file", "secret_env"),
    ("private_key_file", "private_key_env"),
    ("public_key", "public_key_file"),
)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e+06` (how Helm's toYaml writes large numbers) as a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _float_or_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float | int:
    value = loader.construct_yaml_float(node)
    return (
        int(value)
        if value.is_integer() and "." not in str(node.value) and "e" in str(node.value).lower()
        else value
    )


_Loader.add_constructor("tag:yaml.org,2002:float", _float_or_int)


class _Located:
    """Line numbers of every key and list item, and duplicate keys, from the YAML node tree."""

    def __init__(self) -> None:
        self.lines: dict[Loc, int] = {}
        self.duplicates: list[ConfigProblem] = []

    def walk(self, node: yaml.Node, loc: Loc, source: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[object, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is None or key == "<<":
                    continue
                line = key_node.start_mark.line + 1
                if key in seen:
                    self.duplicates.append(
                        ConfigProblem(
                            _render_loc((*loc, key)),
                            f"is set twice (first on line {seen[key]}); the second value would win",
                            "keep one of them",
                            source,
                            line,
                        )
                    )
                seen[key] = line
                self.lines.setdefault((*loc, key), line)
                self.walk(value_node, (*loc, key), source)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[(*loc, index)] = item.start_mark.line + 1
                self.walk(item, (*loc, index), source)

    def line(self, loc: Loc) -> int | None:
        for end in range(len(loc), 0, -1):
            found = self.lines.get(loc[:end])
            if found is not None:
                return found
        return None


def _render_loc(loc: Loc) -> str:
    """('topics', 'my.topic', 'checks') -> 'topics["my.topic"].checks'; list items as `sources[1]`."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            text += f".{part}" if text else part
        else:
            text += f'["{part}"]'
    return text


def _parse(text: str, source: str) -> tuple[Any, _Located]:
    located = _Located()
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, located
        located.walk(node, (), source)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        # Only the problem and its position: yaml's own message quotes the line, which may hold a secret.
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(
            [
                ConfigProblem(
                    "",
                    f"not valid YAML: {exc.problem or exc.context or 'parse error'}",
                    "check indentation and quoting around this line (quote values containing ': ' or '#')",
                    source,
                    mark.line + 1 if mark is not None else None,
                )
            ],
            source,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            [ConfigProblem("", f"not valid YAML ({type(exc).__name__})", None, source)], source
        ) from None
    finally:
        loader.dispose()
    return data, located


# ---------------------------------------------------------------------------------- environment


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The `STREAMPROV__...` variables that override the file, by name (values included: may be secret)."""
    env = os.environ if environ is None else environ
    return {name: env[name] for name in sorted(env) if name.upper().startswith(ENV_PREFIX)}


def _env_value(key: str, raw: str) -> Any:
    """A string, except `[...]`/`{...}` which are read as YAML flow (lists, maps); never for secrets."""
    stripped = raw.strip()
    if stripped[:1] in {"[", "{"} and not is_secret_key(key):
        return yaml.load(stripped, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    return raw


def _apply_env(
    data: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[Loc, str], list[ConfigProblem]]:
    """Set every override into `data` (in place); returns location -> variable name, and problems."""
    origins: dict[Loc, str] = {}
    problems: list[ConfigProblem] = []
    for name, raw in env_overrides(environ).items():
        where = f"environment variable {name}"
        parts = name[len(ENV_PREFIX) :].split(ENV_SEPARATOR)
        if not all(parts):
            problems.append(
                ConfigProblem(
                    "",
                    "is not a setting path",
                    "write STREAMPROV__SECTION__KEY, e.g. STREAMPROV__KAFKA__BOOTSTRAP_SERVERS",
                    where,
                )
            )
            continue
        node: Any = data
        loc: list[str] = []
        failed = False
        for index, part in enumerate(parts):
            key = next((k for k in node if isinstance(k, str) and k.lower() == part.lower()), part.lower())
            loc.append(key)
            if index == len(parts) - 1:
                try:
                    node[key] = _env_value(key, raw)
                except yaml.YAMLError:
                    problems.append(
                        ConfigProblem(
                            _render_loc(tuple(loc)),
                            "is not a valid YAML list or map",
                            "write e.g. [a, b] or {key: value}",
                            where,
                        )
                    )
                    failed = True
                    break
                for group in _SECRET_GROUPS:
                    if key in group:
                        for other in group:
                            if other != key and (*loc[:-1], other) not in origins:
                                node.pop(other, None)
                break
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                problems.append(
                    ConfigProblem(
                        _render_loc(tuple(loc)),
                        f"is a {type(child).__name__} in the file, so {name} cannot set a key inside it",
                        None,
                        where,
                    )
                )
                failed = True
                break
            node = child
        if not failed:
            origins[tuple(loc)] = name
    return origins, problems


# ------------------------------------------------------------------------------ error translation

_HINTS: Final[dict[str, str]] = {
    "bool_type": "write true or false",
    "bool_parsing": "write true or false",
    "int_type": "write a whole number, e.g. 500",
    "int_parsing": "write a whole number, e.g. 500",
    "int_from_float": "write a whole number, e.g. 500",
    "float_type": "write a number, e.g. 0.01",
    "float_parsing": "write a number, e.g. 0.01",
    "string_type": "write a text value (quote it if it looks like a number or true/false)",
    "dict_type": "write a block of key: value settings here",
    "model_type": "write a block of key: value settings here",
    "model_attributes_type": "write a block of key: value settings here",
    "list_type": "write a list, e.g. [a, b]",
    "tuple_type": "write a list, e.g. [a, b]",
}

_FIELD_HINTS: Final[dict[str, str]] = {
    "bootstrap_servers": 'write HOST:PORT[,HOST:PORT...], e.g. bootstrap_servers: "kafka-0.kafka:9092"',
    "kafka": 'add a kafka block with at least bootstrap_servers: "HOST:PORT"',
    "sample_rate": "a fraction of records between 0 and 1, e.g. 0.01 for 1%",
    "acceptable_error_rate": "a fraction between 0 and 1, e.g. 0.01",
}


def _field_type(model: type[BaseModel], loc: Loc) -> Any:
    """The annotation found by walking `loc` from `model` (dict keys and list indexes skipped)."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            if not isinstance(part, str) or part not in current.model_fields:
                return None
            current = current.model_fields[part].annotation
        elif get_origin(current) in {dict, Mapping}:
            current = get_args(current)[1]
        elif get_origin(current) in {tuple, list}:
            current = get_args(current)[0]
        else:
            return None
    return _unwrap(current)


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X; Annotated[X, ...] -> X."""
    while True:
        origin = get_origin(annotation)
        if origin in {Union, types.UnionType}:
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        elif hasattr(annotation, "__metadata__"):
            annotation = get_args(annotation)[0]
        else:
            return annotation


def _is_secret_loc(loc: Loc) -> bool:
    return any(isinstance(part, str) and is_secret_key(part) for part in loc)


def _shown(value: Any) -> str | None:
    if isinstance(value, bool | int | float) or value is None:
        return repr(value) if not isinstance(value, bool) else str(value).lower()
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return None


def _suggest(word: str, choices: list[str]) -> str | None:
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not matches:
        lowered = {c.lower(): c for c in choices}
        matches = [lowered[word.lower()]] if word.lower() in lowered else []
    return f"did you mean {matches[0]!r}?" if matches else None


def _choice_hint(suggestion: str | None, listing: str | None) -> str | None:
    if suggestion and listing:
        return f"{suggestion} ({listing})"
    return suggestion or listing


def _translate(error: Mapping[str, Any]) -> list[tuple[Loc, str, str | None]]:
    """One pydantic error -> (location, message, hint) triples, with no secret in them."""
    kind: str = error["type"]
    loc: Loc = tuple(error["loc"])
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    if kind == CROSS_CHECK_ERROR:
        return [((*loc, *rel), message, hint) for rel, message, hint in ctx["problems"]]
    key_error = bool(loc) and loc[-1] == "[key]"
    if key_error:
        loc = loc[:-1]
    secret = _is_secret_loc(loc)
    shown = None if secret else _shown(value)
    field = next((p for p in reversed(loc) if isinstance(p, str)), "")
    hint = ctx.get("hint") or _HINTS.get(kind) or _FIELD_HINTS.get(field)
    if "detail" in ctx:
        message = str(ctx["detail"])
        if secret:
            message = "is not valid (value hidden: it is a secret)"
    elif kind == "missing":
        message = "is required"
        hint = _FIELD_HINTS.get(field, hint)
    elif kind == "extra_forbidden":
        parent = _field_type(StreamprovConfig, loc[:-1])
        allowed = (
            sorted(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        )
        message = f"unknown setting {field!r}"
        hint = _choice_hint(
            _suggest(field, allowed), f"allowed here: {', '.join(allowed)}" if allowed else None
        )
    elif kind in {"enum", "literal_error"}:
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        message = f"{shown} is not allowed" if shown else "is not allowed"
        suggestion = _suggest(str(value), choices) if isinstance(value, str) and not secret else None
        hint = _choice_hint(suggestion, f"write one of: {', '.join(choices)}" if choices else None)
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
        message = message[0].lower() + message[1:] if message else message
        message = message.removeprefix("input should be ").removeprefix("input ")
        message = f"should be {message}" if not message.startswith(("should", "must", "is")) else message
        if shown is not None:
            message += f", got {shown}"
    if key_error:
        message = f"name {message}" if not message.startswith(("'", '"')) else message
    return [(loc, message, hint)]


def _problems_from(
    exc: ValidationError, located: _Located, origins: Mapping[Loc, str], source: str
) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    for error in exc.errors():
        for loc, message, hint in _translate(error):
            env_name = next(
                (origins[loc[:end]] for end in range(len(loc), 0, -1) if loc[:end] in origins), None
            )
            if env_name is None and located.line(loc) is None:  # a key the file does not have, made
                # by a variable for a setting inside it (a misspelt section: STREAMPROV__VALIDATR__X)
                env_name = next((name for at, name in origins.items() if at[: len(loc)] == loc), None)
            if env_name is not None:
                problems.append(
                    ConfigProblem(_render_loc(loc), message, hint, f"environment variable {env_name}")
                )
            else:
                problems.append(ConfigProblem(_render_loc(loc), message, hint, source, located.line(loc)))
    return problems


def _secret_problems(
    config: StreamprovConfig, environ: Mapping[str, str], located: _Located, source: str
) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    checks: list[tuple[Loc, Any]] = []
    if config.kafka.sasl is not None:
        sasl = config.kafka.sasl
        checks.append((("kafka", "sasl"), lambda: sasl.resolve_password(environ)))
    if config.kafka.ssl is not None:
        ssl = config.kafka.ssl
        checks.append((("kafka", "ssl"), lambda: ssl.resolve_key_password(environ)))
    otlp = config.telemetry.otlp
    if otlp.headers_env:
        checks.append((("telemetry", "otlp"), lambda: otlp.resolve_headers(environ)))
    if config.signing.keys:
        from streamprov.signing import SigningError, load_key  # noqa: PLC0415 - cryptography on demand

        for key_id, key in config.signing.keys.items():

            def check(key_id: str = key_id, key: Any = key) -> None:
                try:
                    load_key(key_id, key, environ)
                except SigningError as exc:
                    raise ValueError(str(exc)) from None

            checks.append((("signing", "keys", key_id), check))
    for loc, resolve in checks:
        try:
            resolve()
        except ValueError as exc:
            field, _, message = str(exc).partition(": ")
            full = (*loc, *field.split("."))
            problems.append(
                ConfigProblem(
                    _render_loc(full),
                    message,
                    "mount the secret there, set the variable, or run `streamprov config validate` with "
                    "--skip-secrets where the secrets are not available",
                    source,
                    located.line(full),
                )
            )
    return problems


def _client_problems(
    config: StreamprovConfig, origins: Mapping[Loc, str], located: _Located, source: str
) -> list[ConfigProblem]:
    """`kafka.client` settings librdkafka does not know, or whose value it refuses: it checks both
    when a client is built, before any connection (a misspelt `lingr.ms` passed `config validate`
    and stopped the service at start)."""
    from confluent_kafka import KafkaException, Producer  # noqa: PLC0415 - only when there are some

    problems: list[ConfigProblem] = []
    for key, item in config.kafka.client.items():
        value = item.get_secret_value() if isinstance(item, SecretStr) else item
        if key.endswith(".location"):  # a file of the deployment, maybe not of this machine: name only
            value = ""
        try:
            Producer({"log_level": 0, key: value})  # no bootstrap.servers: it connects to nothing
        except KafkaException as exc:
            text = exc.args[0].str() if exc.args else str(exc)
            if "No such configuration property" in text:
                message, hint = "librdkafka has no such setting", _LIBRDKAFKA_HINT
            elif "Invalid value" in text:
                message, hint = f"librdkafka refuses its value: {text}", _LIBRDKAFKA_HINT
            else:
                continue  # depends on other settings: the service reports it with them
            loc = ("kafka", "client", key)
            name = origins.get(loc)
            where = f"environment variable {name}" if name else source
            problems.append(ConfigProblem(_render_loc(loc), message, hint, where, located.line(loc)))
    return problems


_LIBRDKAFKA_HINT = (
    "see the names and values in https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md"
)


def _order(problem: ConfigProblem) -> tuple[int, int, str]:
    return (0 if problem.line is not None else 1, problem.line or 0, problem.location)


# ------------------------------------------------------------------------------------ entry points


def loads_config(
    text: str,
    *,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    check_secrets: bool = True,
) -> StreamprovConfig:
    """Parse and validate configuration text (see `load_config`); `source` names it in errors."""
    env = os.environ if environ is None else environ
    data, located = _parse(text, source)
    problems = list(located.duplicates)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [
                ConfigProblem(
                    "",
                    f"the file holds a {type(data).__name__}, not settings",
                    "start with the kafka: block; see `streamprov config example`",
                    source,
                    1,
                )
            ],
            source,
        )
    origins, env_problems = _apply_env(data, env)
    problems.extend(env_problems)
    config: StreamprovConfig | None = None
    try:
        config = StreamprovConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problems_from(exc, located, origins, source))
    if config is not None and check_secrets:
        problems.extend(_secret_problems(config, env, located, source))
    if config is not None and config.kafka.client:
        problems.extend(_client_problems(config, origins, located, source))
    if problems or config is None:
        raise ConfigError(sorted(problems, key=_order), source)
    return config


def load_config(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    check_secrets: bool = True,
) -> StreamprovConfig:
    """Load `streamprov.yaml`, apply `STREAMPROV__A__B` environment overrides, validate.

    `environ` defaults to `os.environ`. With `check_secrets` (default) a password given as a file or an
    environment variable must be readable now, so a service fails at start, not at first connect.
    Raises `ConfigError` listing every problem.
    """
    file = Path(path)
    source = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [
                ConfigProblem(
                    "", "file not found", "write one with `streamprov config example > FILE`", source
                )
            ],
            source,
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            [ConfigProblem("", f"cannot read the file ({type(exc).__name__}: {exc})", None, source)], source
        ) from None
    return loads_config(text, source=source, environ=environ, check_secrets=check_secrets)
