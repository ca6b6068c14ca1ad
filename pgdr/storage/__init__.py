"""Where backups live: the repository (a directory or S3), the S3 bucket's set-up, AWS,
storage snapshots and the DR-region replica."""
