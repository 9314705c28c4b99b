"""A job: its keys and defaults (keys.py), its file read from the inbox (file.py), checked against
the limits (check.py), and typed once for everything that runs or reports it (spec.py)."""
