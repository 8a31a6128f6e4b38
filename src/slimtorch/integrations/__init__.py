"""Integrations with third-party model libraries."""
