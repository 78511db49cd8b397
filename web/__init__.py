"""The web app: a page to draw or upload a digit, see the model's answer and correct it (`digits web`)."""
