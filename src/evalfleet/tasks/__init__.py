"""evalfleet.tasks."""
