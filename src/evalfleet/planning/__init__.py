"""evalfleet.planning."""
