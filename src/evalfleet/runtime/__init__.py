"""evalfleet.runtime."""
