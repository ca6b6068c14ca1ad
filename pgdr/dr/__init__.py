"""Disaster recovery: what a failover restores and where, drills measured, fleets."""
