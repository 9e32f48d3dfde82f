"""Pure building blocks with an injected clock: backoff, clocks, rate limits.

Imports nothing else of ours."""
