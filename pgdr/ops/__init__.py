"""Operating pgdr: errors, configuration, audit records, notifications, metrics."""
