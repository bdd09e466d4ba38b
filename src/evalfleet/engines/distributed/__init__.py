"""evalfleet.engines.distributed."""
