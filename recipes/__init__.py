"""Runnable training recipes (``accelerate launch recipes/<name>.py --config ...``); importable for tests and bench."""
