"""Vendor processes and shared fixtures for the control API tests."""
