"""The Prefect tasks of pgdr's flows, by domain: retries, timeouts, tags and the transient-error
policy around the plain functions of the pgdr package."""
