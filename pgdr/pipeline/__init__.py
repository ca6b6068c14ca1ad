"""Child processes and the byte pipelines of a backup: dump, compression, encryption,
the stall watchdog."""
