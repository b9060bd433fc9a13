"""The experiment layer: a YAML and its overrides -> validated config -> run directory -> pieces -> Trainer -> fit.

config.py (compose, save) -> validate.py -> preflight.py -> run_dir.py -> assemble.py (tokenizer,
DataModule, VLMModule) -> runner.py (callbacks, strategy.py, Trainer, fit); describe.py for --describe.
"""
