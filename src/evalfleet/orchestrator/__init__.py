"""evalfleet.orchestrator."""
