"""The TFX pipeline definition, its runners and the `digits` command line."""


def __getattr__(name: str):
    # TFX's Vertex AI entry point imports a step's custom artifact type as `<package>.<Class>`; importing
    # it here on demand keeps TFX out of every other `import pipeline...`.
    if name == "HtmlReport":
        from pipeline.report_component import HtmlReport

        return HtmlReport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
