"""OpenTelemetry traces (the top-level key ``tracing``): a span per Postfix request, a child span per
backend exchange, and the W3C ``traceparent``/``tracestate`` sent to the backend with each request, so
that the backend's own spans join the same trace.  Spans go to the collector over OTLP/HTTP
(protobuf) from the SDK's batch processor: a thread of its own, never the request path.

The SDK is the optional extra ``pfrest[otel]``, imported by ``configure`` only when ``tracing`` is set;
without it ``tracer`` stays None, and the request path pays one test of that global (the conversation
for its request span, the backend client for its exchange span).  At the top of the package because
both use it; it imports nothing of pfrest's folders.

Attributes never hold a lookup key, a policy attribute, a password or a token: the endpoint, its mode,
the reply's class, the request id and the cache's part; for an exchange the target's origin, the HTTP
status or failure kind, the attempt and whether the endpoint fails over.
"""

import logging

log = logging.getLogger("pfrest")

tracer = None          # the SDK's tracer while tracing is configured, else None
EXPORT_TIMEOUT = 5.0   # seconds an export to the collector may take (the batch thread's, not a request's)
FLUSH_TIMEOUT_MS = 5000   # at the end of a process, for the spans still in the batch
_settings = _provider = _propagator = _current_span = None
last_sent = None       # the trace context lines last sent, for pfrest query


def configure(settings):
    """Trace as ``settings`` (config's Tracing, or None for no tracing) say from now on."""
    global tracer, _settings, _provider, _propagator, _current_span
    if settings == _settings:
        return
    shutdown()
    _settings = settings
    if settings is None:
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import get_current_span
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as exc:
        log.error("tracing is configured but the OpenTelemetry SDK is not installed (%s): pip install "
                  "'pfrest[otel]'; running without traces", exc)
        return
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}),
                              sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint,
                                                                    timeout=EXPORT_TIMEOUT)))
    _provider, _propagator, _current_span = provider, TraceContextTextMapPropagator(), get_current_span
    tracer = provider.get_tracer("pfrest")


def shutdown():
    """Export what is left and stop (at the end of a process, or before another configuration)."""
    global tracer, _provider, _settings
    if _provider is not None:
        _provider.force_flush(FLUSH_TIMEOUT_MS)
        _provider.shutdown()
    tracer = _provider = _settings = None


def headers() -> bytes:
    """The traceparent (and tracestate) lines of the current span, for the backend request."""
    global last_sent
    carrier = {}
    _propagator.inject(carrier)
    last_sent = "".join(f"{name}: {value}\r\n" for name, value in carrier.items())
    return last_sent.encode("ascii")


def sampled() -> bool:
    """Whether an exchange gets a span: not in a request sampled out (its context is sent on, marked
    not sampled); yes without a request span (pfrest query), where the sampler decides."""
    span = _current_span()
    return span.is_recording() or not span.get_span_context().is_valid


# --- the request span: conversation.py ---------------------------------------------------------------

def start_request(service, request_id: str, cache: str):
    """The span of one Postfix request, and the token that makes it current (``end_request`` ends
    both): a backend call started meanwhile, in a task made meanwhile, is its child."""
    from opentelemetry import context, trace
    # a root span: the next request of a connection starts in the task of the previous one, whose
    # context still has that one's span
    span = tracer.start_span(f"pfrest {service.mode.name}", context.Context(), trace.SpanKind.SERVER, {
        "pfrest.endpoint": service.endpoint.name, "pfrest.mode": service.mode.name,
        "pfrest.request_id": request_id, "pfrest.cache": cache})
    return span, context.attach(trace.set_span_in_context(span))


def current_done(token):
    """The request's span is no longer current in this callback (its task has it)."""
    from opentelemetry import context
    context.detach(token)


def end_request(span, reply: str, cache=None):
    if cache is not None:
        span.set_attribute("pfrest.cache", cache)
    span.set_attribute("pfrest.reply", reply)
    span.end()


# --- the exchange span: backend/client.py ------------------------------------------------------------

def start_exchange(method: str, origin: str, attempt: int, failover: bool):
    """A span for one exchange with a target, current until ``end_exchange``: (span, token)."""
    from opentelemetry import context, trace
    span = tracer.start_span(f"{method} {origin}", kind=trace.SpanKind.CLIENT, attributes={
        "server.address": origin, "http.request.method": method, "pfrest.attempt": attempt,
        "pfrest.failover": failover})
    return span, context.attach(trace.set_span_in_context(span))


def end_exchange(span, token, outcome: str, status=None):
    from opentelemetry import context
    context.detach(token)
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    span.set_attribute("pfrest.outcome", outcome)
    span.end()
