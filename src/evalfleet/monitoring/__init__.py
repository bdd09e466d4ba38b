"""evalfleet.monitoring."""
