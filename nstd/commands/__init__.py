"""The operator's commands (stylize, run, validate, status, retry, cancel); nstd/cli.py parses and dispatches."""
