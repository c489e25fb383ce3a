"""Data: the built-in synthetic physics world (`physics`) and its Grain pipeline (`pipeline`)."""
