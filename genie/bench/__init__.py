"""``genie bench ...``: speed numbers for the hot paths, printed as a table and written as JSON."""
