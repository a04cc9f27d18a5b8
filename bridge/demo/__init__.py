"""The demo: the whole loop on loopback (``midbridge demo``), its sample targets and the
embedded broker."""
