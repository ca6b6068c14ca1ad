"""pgdr's Prefect flows, one module per runbook operation, and the command line."""
