"""Worker processes for fault-injection tests, and the helpers that run them."""
