"""The engine: owns executions. A process manager with saga semantics, state in Redis."""
