"""The floor: the registry type, the typed config groups and type checks. Imports nothing from the project."""
