"""opd.stages."""
