"""opd.pipeline."""
