"""Custom-metered usage: validate, store durably, seal each hour, send it once with MeterUsage."""
