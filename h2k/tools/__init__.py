"""Wrappers around the external disk tools; each failure is an h2k error."""
