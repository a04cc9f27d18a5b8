"""The built-in instance: a small platform of our own that speaks ServiceNow's Table API.

It holds the ECC queue, agents, users and roles, credentials and (later) discovery, and
talks to bridges only through the broker contract (``docs/wire-contract.md``).
"""
