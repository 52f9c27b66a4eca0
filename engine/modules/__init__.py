"""Built-in modules. Each module has a code (`baton.hold`), a level and takes control of sessions."""
