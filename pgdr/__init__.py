"""pgdr's work, as plain functions: no Prefect import (the WAL commands must start fast).

The Prefect tasks around it live in tasks/, the flows in flows/."""
