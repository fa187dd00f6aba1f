"""The executor: runs planned stages on a real model, measures, saves, verifies, reports."""
