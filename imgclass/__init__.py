"""imgclass: image classification as a distributed web service."""

__version__ = "0.1.0"
