"""The DeepSeek-V3-style network and its engine, in plain PyTorch (no Prefect, no MLflow)."""
