"""A study's results (no torch): the SQLite store, seed-level tables, findings and the HTML report."""
