"""Development tooling of the pack (not shipped to the registry)."""
