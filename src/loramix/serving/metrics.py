"""`loramix serve`'s Prometheus metrics (GET /metrics, the text exposition format, through the official
`prometheus_client`): what Prometheus scrapes from vLLM, TGI or LoRAX, under `loramix_` names.

Counters (Prometheus' `rate()` turns them into per-second rates, tokens/s included):
- `loramix_requests_total{endpoint, status}`: HTTP requests answered, by route (its template, "/v1/models/{name}";
  "other" for paths no route serves) and status code; a refused API key counts (401), a hung-up client as 499;
- `loramix_prompt_tokens_total`: prompt tokens of the generation calls the engine accepted (each prompt once,
  whatever `n`: the `usage.prompt_tokens` the answers report);
- `loramix_generation_tokens_total`: new tokens, every choice's, counted as they are generated.
Gauges, read when scraped: `loramix_rows_running` (rows in the decode batches), `loramix_rows_waiting` (rows
queued), `loramix_requests_in_progress{endpoint}` (HTTP calls not yet answered).
Histograms (seconds): `loramix_time_to_first_token_seconds{endpoint}`, from the request's arrival to each
choice's first new token; `loramix_request_duration_seconds{endpoint}`, from arrival to the answer's last byte
(a whole stream for a streamed answer).

Each server has its own registry (never the process-wide default one), so several servers in one process keep
their own counts. Counting happens at the HTTP layer (`MetricsMiddleware`) and at the request layer
(requests.py), never in the engine.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.routing import Match

# seconds; first tokens come within a prefill, whole answers may take minutes
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0,
                    300.0, 600.0)
ARRIVAL_KEY = "loramix_arrival"  # the request's arrival time (time.perf_counter()) in the ASGI scope's state
ENDPOINT_KEY = "loramix_endpoint"  # ... and its endpoint label
OTHER = "other"  # the endpoint label of a path that no route serves


class ServerMetrics:
    """The metrics of one server, in their own registry; `engine` (rows running and waiting) is read at scrape
    time."""

    def __init__(self, engine) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("loramix_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("loramix_prompt_tokens", "prompt tokens of the generation calls accepted",
                                     registry=registry)
        self.generation_tokens = Counter("loramix_generation_tokens", "tokens generated, every choice's",
                                         registry=registry)
        self.in_progress = Gauge("loramix_requests_in_progress", "HTTP requests not yet answered", ["endpoint"],
                                 registry=registry)
        running = Gauge("loramix_rows_running", "rows (prompt x choice) in the decode batches", registry=registry)
        running.set_function(lambda: engine.active_rows())
        waiting = Gauge("loramix_rows_waiting", "rows (prompt x choice) queued for a place in a batch",
                        registry=registry)
        waiting.set_function(lambda: len(engine.waiting))
        self.time_to_first_token = Histogram(
            "loramix_time_to_first_token_seconds", "from the request's arrival to each choice's first new token",
            ["endpoint"], buckets=TTFT_BUCKETS, registry=registry)
        self.duration = Histogram("loramix_request_duration_seconds",
                                  "from the request's arrival to the answer's last byte", ["endpoint"],
                                  buckets=DURATION_BUCKETS, registry=registry)
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...

    def exposition(self) -> tuple[bytes, str]:
        """The registry in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CallCounts:
    """One generation call's share of the counters: its prompt tokens once the engine accepted its rows, each
    choice's new tokens as its events arrive (`saw`), and each choice's time to first token. `scope`: the call's
    ASGI scope, where `MetricsMiddleware` noted its arrival and endpoint (now and OTHER when nothing did)."""

    def __init__(self, metrics: ServerMetrics, scope: dict, n_rows: int, prompt_tokens: int) -> None:
        noted = scope.get("state", {})
        self.metrics, self.counted = metrics, [0] * n_rows
        self.arrival = noted.get(ARRIVAL_KEY, time.perf_counter())
        self.first_token = metrics.time_to_first_token.labels(noted.get(ENDPOINT_KEY, OTHER))
        metrics.prompt_tokens.inc(prompt_tokens)

    def saw(self, index: int, n_generated: int, late: bool = False) -> None:
        """Choice `index` has generated `n_generated` tokens so far; `late`: counted as the call ends, when its
        first token's time would not be its arrival's."""
        new = n_generated - self.counted[index]
        if new <= 0:
            return
        if self.counted[index] == 0 and not late:
            self.first_token.observe(time.perf_counter() - self.arrival)
        self.counted[index] = n_generated
        self.metrics.generation_tokens.inc(new)


def endpoint_of(routes, scope: dict) -> str:
    """The path template of the route serving `scope` ("/v1/models/{name}"), or OTHER: a label with a bounded
    set of values whatever paths clients ask for."""
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", OTHER)
    return OTHER


class MetricsMiddleware:
    """ASGI middleware, outermost: each HTTP request's endpoint, status, time in flight and duration; it notes
    the arrival time and endpoint in the scope's state for the request layer's time to first token. `routes`:
    the app's route list (read at each request, so routes added later count)."""

    def __init__(self, app, metrics: ServerMetrics, routes) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        endpoint = endpoint_of(self.routes, scope)
        scope.setdefault("state", {}).update({ARRIVAL_KEY: start, ENDPOINT_KEY: endpoint})
        status = 499  # unless a response starts: the client went away first

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        in_progress = self.metrics.in_progress.labels(endpoint)
        in_progress.inc()
        try:
            await self.app(scope, receive, sending)
        except Exception:
            status = 500
            raise
        finally:
            in_progress.dec()
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.duration.labels(endpoint).observe(time.perf_counter() - start)
