"""One module per analysis, holding its pure arithmetic (no Ray, no models): tested on its own."""
