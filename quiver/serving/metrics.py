"""The service's Prometheus metrics, in a registry of its own (prometheus_client: the Prometheus project's own
client, which gets the text format, histogram buckets and thread safety right)."""

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Requests, latency, batch sizes, errors and the served index version."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        disable_created_metrics()  # the *_created samples of every series say nothing a scraper needs here
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("quiver_search_requests", "Search requests answered, by store and HTTP status.",
                                ["store", "status"], registry=r)
        self.latency = Histogram("quiver_search_request_seconds", "Time from a search request's arrival to its "
                                 "answer (validation, waiting for a batch, encoding, search).", ["store"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queries = Counter("quiver_search_queries", "Queries answered (a request may carry several).",
                               ["store"], registry=r)
        self.batch_queries = Histogram("quiver_batch_queries", "Queries per micro-batch: one forward pass and "
                                       "one search per store and source.", buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("quiver_batch_requests", "Requests per micro-batch.",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("quiver_batch_seconds", "Time a micro-batch takes (encode and search).",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("quiver_errors", "Requests refused or failed, by kind (bad_request, "
                              "unauthorized, unavailable, internal, ...).", ["kind"], registry=r)
        self.index_info = Gauge("quiver_index_version_info", "The FAISS version being served (value 1).",
                                ["version"], registry=r)
        self.index_vectors = Gauge("quiver_index_vectors", "Vectors in the FAISS version being served.", registry=r)
        self.index_swaps = Counter("quiver_index_swaps", "Times a new FAISS version was opened and served.",
                                   registry=r)
        self.index_refusals = Counter("quiver_index_swap_failures", "New FAISS versions not served, by reason "
                                      "(failed: could not be opened; refused: another model).", ["reason"],
                                      registry=r)
        self.index_open_seconds = Gauge("quiver_index_open_seconds", "Time the served version took to open.",
                                        registry=r)
        self.ready = Gauge("quiver_ready", "1 when the model is loaded and an index is served.", registry=r)

    def on_index_event(self, event: str, facts: dict[str, Any]) -> None:
        """The index watcher's events."""
        if event == "swap":
            self.index_info.clear()
            self.index_info.labels(version=facts["version"]).set(1)
            self.index_vectors.set(facts["vectors"])
            self.index_open_seconds.set(facts["open_seconds"])
            self.index_swaps.inc()
        elif event in ("failed", "refused"):
            self.index_refusals.labels(reason=event).inc()

    def on_batch(self, requests: int, queries: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_queries.observe(queries)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
