"""An AWS Marketplace Metering emulator for demos and tests (never used in production)."""
