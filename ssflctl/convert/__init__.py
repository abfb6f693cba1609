"""Dataset converters (``ssflctl convert ...``) and synthetic test data generators."""
