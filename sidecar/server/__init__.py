"""The local HTTP API, the probe listener and the probe command."""
