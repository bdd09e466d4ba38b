"""evalfleet.service."""
