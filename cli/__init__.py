"""The `gkd-async` command line."""
