"""The service layer: an HTTP API and a web dashboard over the job store, and run-to-run comparison.

It imports the orchestrator and the engines; nothing below it imports the service.
"""
