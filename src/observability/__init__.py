"""Operating the daemon: logs, metrics, health, the status page and command, alerts."""
