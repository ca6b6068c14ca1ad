"""What the repository holds: key layout, manifests, retention, locks and status."""
