"""Violations: usage statistics per window, plan limits and the warn/penalty/quarantine ladder."""
