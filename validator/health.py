"""The HTTP endpoints moved to `streamprov.agents.health` (every service serves them); these names
stay for code that imports them from here."""

from streamprov.agents.health import HttpEndpoints, Probe, Route, metrics_route, probe_route

__all__ = ["HttpEndpoints", "Probe", "Route", "metrics_route", "probe_route"]
