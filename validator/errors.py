"""The Validator's errors, all under streamprov's root `StreamprovError`.

Errors that come from the Kafka client keep librdkafka's error (and so its code), as the processor's
do, so an operator sees what the broker said, not a paraphrase.
"""

from __future__ import annotations

from confluent_kafka import KafkaError

from streamprov.errors import StreamprovError


class ValidatorError(StreamprovError):
    """The Validator cannot go on; `kafka_error` keeps librdkafka's error when there is one."""

    def __init__(self, message: str, kafka_error: KafkaError | None = None) -> None:
        super().__init__(message)
        self.kafka_error = kafka_error
        self.code: int | None = None if kafka_error is None else int(kafka_error.code())


class ValidatorConfigError(ValidatorError):
    """The configuration cannot work (e.g. re-derivation enabled without a function registry)."""


class FatalValidatorError(ValidatorError):
    """librdkafka reported a fatal error: the client can do nothing more; restart the service."""


class SourceViewError(ValidatorError):
    """The local source view cannot be opened or kept up to date."""
