"""A sampler for pipelines with reduce steps: parent-based, and a root with a sampled link is sampled.

A reduce output's span is a root linking to its inputs' spans; with a plain `ParentBased(ratio)` its
sampling ignores the inputs, so a sampled input trace usually ends at the reduce. `LinkAwareParentBased`
samples such a root whenever one of its links is sampled, and otherwise behaves as `ParentBased(root)`.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes


class LinkAwareParentBased(Sampler):
    def __init__(self, root: Sampler) -> None:
        self._root = root
        self._delegate = ParentBased(root)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if not parent.is_valid and links and any(link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
        return self._delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"LinkAwareParentBased{{root:{type(self._root).__name__}}}"
