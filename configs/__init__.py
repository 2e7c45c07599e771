"""opd.configs."""
