"""What tests share besides fixtures (those live in tests/conftest.py), one module per topic:

paths          the checkout and the tests' fixture files
tiny_models    the tiny CLIP, ViT, SAM and Llama shapes, each defined once (dicts, YAML derived)
quickstart     the quickstart shrunk to seconds (overrides built from tiny_models)
runs           in-process runs: fit with extra callbacks, per-step loss recording
processes      train.py as a user launches it: argv, start in its own process group, kill after a checkpoint
events         reading TensorBoard scalars of a run directory
experiments    the experiment YAMLs to parametrise over
encoder_sizes  full-size encoder shapes and parameter counts, written out by hand
lmms_tasks     local lmms-eval tasks over the built-in shapes data
"""
