"""The floor: the registry type, the typed config groups, type checks and the user-error types. Imports nothing
from the project above it."""
