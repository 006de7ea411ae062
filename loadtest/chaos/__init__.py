"""The chaos run (issue 11): faulted money workload, its history, and its checker."""
