"""Hydra config group (YAML files beside this one)."""
