"""The feedback service: what comes back after a send (one-click unsubscribes, the provider's
delivery events), kept in the outbox where every later run's extract reads it."""
