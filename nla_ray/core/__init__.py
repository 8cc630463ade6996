"""Pure leaves: typed coercion, metrics, provenance, padding, sampling noise, arrow tables."""
