"""ssflctl: Focal-Loss-family detection studies on Slurm or local processes."""

__version__ = "0.1.0"
