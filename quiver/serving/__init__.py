"""The search service's plain logic: request validation, micro-batching, index watching and hot swap, result
shapes, metrics and the HTTP client of `quiver search`. No Dagster here; the FastAPI app and its wiring to the
resources are platform_defs/serve.py."""
