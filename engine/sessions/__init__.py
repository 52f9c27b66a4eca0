"""Sessions and what they consult: the session, apps, the dispatcher, policy, the stamper, the journal."""
