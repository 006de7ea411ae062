"""livegift's load generator and peer comparison (``python -m loadtest``)."""
