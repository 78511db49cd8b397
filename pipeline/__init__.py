"""The TFX pipeline definition, its runners and the `digits` command line."""
