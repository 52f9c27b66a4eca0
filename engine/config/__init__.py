"""The engine configuration: loading and checking it (load), its documentation (doc), API keys."""
