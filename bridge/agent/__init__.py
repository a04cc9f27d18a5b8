"""The MID runtime: intake, scheduler, runner, egress and outbox, status and control,
configuration, local credentials, the key files, metrics."""
