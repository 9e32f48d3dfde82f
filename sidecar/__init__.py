"""AWS Marketplace metering sidecar: verified RegisterUsage entitlement for paid containers."""

__version__ = "0.1.0"
