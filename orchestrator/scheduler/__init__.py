"""The scheduler: owns time. Cron planning, the due index, admission and flow-start ingress."""
