"""Data in: reading sources (files, folders, ODBC), validating and repairing them by policy, the
streamed bounded-memory ingestion, the time grid, and the mini-batch files of a prepared dataset."""
