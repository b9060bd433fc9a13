"""A trained run used without the Trainer: loaded, answered with, exported (the layout: docs/ARCHITECTURE.md)."""
