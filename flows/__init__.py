"""Prefect flows, deployments and the `tinyseek` command line."""
