"""The package version, in its own module so that modules inside the package never import ``dpn_lens``."""

__version__ = "0.1.0"
