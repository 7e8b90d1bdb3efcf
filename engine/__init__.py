"""Ray engine: search loop, run storage and the command line."""
