"""What both ends of the wire share: records, errors, topics, the MQTT transport and its
acknowledgements, sealing and signatures (stateless), credential types, targets.

Nothing here imports the MID runtime (``bridge.agent``), the probes or the platform."""
