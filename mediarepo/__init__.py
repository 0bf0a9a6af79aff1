"""mediarepo: a Synapse-compatible Matrix media repository server on Twisted."""

__version__ = "0.1.0"
