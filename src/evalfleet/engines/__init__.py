"""evalfleet.engines."""
