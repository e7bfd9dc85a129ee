"""Observability: Prometheus metrics (`metrics`), the HTTP metrics middleware (`middleware`) and
structured logs with per-request context (`logs`). Imports nothing from `api`, `storage` or `cache`;
the engine, the storage layer and the cache layer are read only through their `metrics_snapshot()`."""
