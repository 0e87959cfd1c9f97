"""Which instrumentation a server runs, decided once when it is built.

Both metrics serving and tracing are off by default; with both off no
handler layer is added and no probe is made, so a call costs what it cost
before (the domain counters of metrics.py excepted: an addition each).
The choice is the process's (app.build makes it before building the
areas, which take their probes from it); a process running several
servers, as the tests do, gets each server's choice in that server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tether.server.observability.handlers import ObservingLayer
from tether.server.settings import Settings

_OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_wanted(settings: Settings) -> bool:
    """TETHER_TRACING=true, or an OTLP endpoint in the standard variables;
    OTEL_SDK_DISABLED=true turns it off whatever else says."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return settings.tracing or any(os.environ.get(name) for name in _OTLP_ENDPOINTS)


@dataclass(frozen=True)
class Observability:
    metrics: bool = False
    # An opentelemetry Tracer (Any: its module is imported only when on).
    tracer: Any = None
    tracer_provider: Any = None

    @property
    def tracing(self) -> bool:
        return self.tracer is not None

    def layers(self) -> list[ObservingLayer]:
        """What the generic handler wraps every method in: tracing outermost,
        so its span covers the metrics' timing too."""
        found: list[ObservingLayer] = []
        if self.tracer is not None:
            from tether.server.observability.tracing import TracingLayer

            found.append(TracingLayer(self.tracer))
        if self.metrics:
            from tether.server.observability.grpc_metrics import MetricsLayer

            found.append(MetricsLayer())
        return found

    def shutdown(self) -> None:
        """Sends the spans still buffered (a provider made here only)."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()


class _Current:
    """The choice of the server built last in this process."""

    observability = Observability()


def configure(settings: Settings, tracer_provider: Any = None) -> Observability:
    """The instrumentation of the server being built. tracer_provider: the
    embedding code's own (tests pass one with an in-memory exporter); None:
    one exporting over OTLP when tracing is wanted."""
    owned = None
    if tracer_provider is None and tracing_wanted(settings):
        from tether.server.observability.tracing import exporting_provider

        tracer_provider = owned = exporting_provider()
    tracer = None
    if tracer_provider is not None:
        from tether.server.observability.tracing import TRACER_NAME

        tracer = tracer_provider.get_tracer(TRACER_NAME)
    _Current.observability = Observability(bool(settings.metrics_listen), tracer, owned)
    return _Current.observability


def current() -> Observability:
    return _Current.observability
