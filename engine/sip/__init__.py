"""Baton's own SIP stack (RFC 3261): parser, transports, transactions, dialogs."""
