"""The nn.Module VLM and its one composition root: vision tower -> projector -> LLM (+ LoRA), and a FLOP model.

`model.build.build_vlm(ModelConfig, tokenizer)` wires encoder (encoders.ENCODERS) -> reducer -> enhancer ->
projector (model.projector.PROJECTORS) -> transformers causal LM; `model.vlm.VisionLanguageModel` runs it.
"""
