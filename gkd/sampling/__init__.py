from gkd.sampling.base import SamplingEngine, SamplingSettings
from gkd.sampling.transformers_engine import TransformersEngine

__all__ = ["SamplingEngine", "SamplingSettings", "TransformersEngine"]
