"""The NLA format and engines: sidecar, templates, model sources, extraction, AV, AR, pairs."""
