"""Spanda's command-line entry point (``spanda``). The libraries are ``compiler``, ``runtime``, ``artifacts``."""

__version__ = "0.1.0"
