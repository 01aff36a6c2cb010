"""Worker runtime: step handlers, concurrency, heartbeats, usage measurement (issue: engine)."""
