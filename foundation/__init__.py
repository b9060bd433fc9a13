"""The floor: the registry type, config schema, stage table, type checks and user errors. Imports nothing from
the project (the layout: docs/ARCHITECTURE.md)."""
