"""The application shell: command line, logging setup, datasets, replay and ``fusebus up``."""

__version__ = "0.1.0"
__all__ = ["__version__"]
