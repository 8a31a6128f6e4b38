"""Workflows as data: recipes (YAML), their runner, and the reproduced experiments."""
