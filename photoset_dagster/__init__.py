"""photoset: an orchestrated pipeline from a remote list of approved photos to a training-ready dataset."""

__version__ = "0.1.0"
