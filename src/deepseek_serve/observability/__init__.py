"""Observability: Prometheus metrics (`metrics`), the HTTP metrics middleware (`middleware`) and
structured logs with per-request context (`logs`). Imports nothing from `api`; the engine is read
only through `engine.stats()`."""
