"""The blackbox exporter's config and the predict probe's request (see blackbox.yml)."""
