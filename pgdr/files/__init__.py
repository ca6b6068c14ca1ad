"""Backups of files: configuration, encrypted environment files, Terraform state, manifests."""
