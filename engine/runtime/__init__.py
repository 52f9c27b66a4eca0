"""The wiring of the engine process: the engine itself (server) and its HTTP server."""
