"""Hourly entitlement: keys, token check, state machine, verdict store, registrar.

Importable without boto3 (the product-side client uses `keys` and `verify`)."""
