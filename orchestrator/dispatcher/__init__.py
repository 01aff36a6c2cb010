"""The dispatcher: owns fairness. Per-tenant queues in, work queues out, by weighted SFQ."""
