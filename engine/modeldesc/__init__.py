"""Model descriptions for planning, torch-free: parameter counts and the dimensions the memory
model needs, from a Hugging Face config.json (or from counts alone).

    describe_file(Path("config.json"), where)   -> ModelDescription (registry.py)
    describe_config(dict, source)                -> ModelDescription
    FAMILIES                                     model_type -> describing function

Modules: description.py (the dataclass), fields.py (typed config reading with transformers'
defaults), decoders.py (Llama-style), gpt.py (GPT-2, GPT-NeoX, Falcon), encoders.py (BERT,
RoBERTa, DeBERTa), t5.py, registry.py, shape.py (a description as the planner's ModelShape),
traits.py (what decides a family's saved activations), activations.py and acts_encoders.py (the
bytes autograd saves per family, which engine/memory_acts.py uses for a described model).
tests/unit/test_modeldesc.py checks every family against transformers on the meta device with the
published configs in tests/fixtures/hf_configs/; tests/unit/test_family_activations.py checks the
activations against the bytes autograd saves in tiny transformers models.
"""

from __future__ import annotations

from dsl.engine.modeldesc.description import ModelDescription
from dsl.engine.modeldesc.registry import FAMILIES, describe_config, describe_file, read_config

__all__ = ["FAMILIES", "ModelDescription", "describe_config", "describe_file", "read_config"]
