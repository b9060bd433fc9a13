"""The experiment layer: a YAML and its overrides to a finished fit (the layout: docs/ARCHITECTURE.md)."""
