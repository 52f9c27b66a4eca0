"""Baton: a programmable telephony engine."""
__version__ = "0.1.0"
