"""The team stack (docker-compose.yml) run as plain local processes, for machines without Docker."""
