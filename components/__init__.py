"""Functions the TFX components run: preprocessing, model, input pipeline, signatures."""
