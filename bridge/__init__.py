"""midbridge: a MID Server bridge that carries the ECC queue over MQTT 5."""

__version__ = "0.1.0"
