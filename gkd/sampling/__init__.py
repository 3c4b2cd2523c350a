from gkd.sampling.base import SamplingEngine, SamplingSettings, derive_seed
from gkd.sampling.transformers_engine import TransformersEngine

__all__ = ["SamplingEngine", "SamplingSettings", "TransformersEngine", "derive_seed"]
