"""Builds GZIP TFRecord shards of PNG bytes + label from a Kaggle mnist-png tree."""
