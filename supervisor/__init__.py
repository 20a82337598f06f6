"""The corral daemon: config, broker, process manager, control and CLI."""
