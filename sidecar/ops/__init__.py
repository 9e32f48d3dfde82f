"""Operations: metrics, logs and the Kubernetes mirrors (readiness gate, Events)."""
