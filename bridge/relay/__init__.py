"""The relay: a MID for a real ServiceNow instance, over its REST Table API."""
