"""Model serving: a TF-Serving-compatible local server and its clients."""
