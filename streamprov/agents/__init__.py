"""Agents that apply registered functions and stamp provenance: faust-streaming and confluent-kafka."""
