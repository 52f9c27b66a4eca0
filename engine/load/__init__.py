"""`baton load`: Baton's own UAC and media clock as a load generator for other SIP systems."""
