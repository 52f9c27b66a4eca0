"""Cython extensions for Baton's hot paths (built by setup.py; see engine/ for the Python twins)."""
