"""The agent team: a master and four roles that work a task through the bus."""
