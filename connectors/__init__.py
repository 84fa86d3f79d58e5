"""Connectors: adapters that run jobs of a service (simulation, noop, ...) behind appliance.connector."""
