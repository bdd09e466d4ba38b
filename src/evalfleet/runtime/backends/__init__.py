"""evalfleet.runtime.backends."""
