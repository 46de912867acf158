"""DEP Studio: personalized review generation with difference-aware embeddings (DEP).

Pipeline: data -> embeddings -> store (history, peers) -> differences -> adapter -> prompt -> LLM.
"""
from .adapter import AdapterError, DEPAdapter, DEPAdapterConfig
from .data import DataError, Dataset, Item, Review, Sample, chronological_split, load_dataset, parse_history
from .embeddings import Encoder
from .engine import DEPEngine, EngineConfig, Prepared, Request, Result
from .llm import load_llm
from .prompt import MODES
from .settings import BOUNDS, PersonalizationSettings, SamplingSettings
from .store import PersonalContext, ReviewStore

__all__ = ["AdapterError", "DEPAdapter", "DEPAdapterConfig", "DataError", "Dataset", "Item", "Review", "Sample",
           "chronological_split", "load_dataset", "parse_history", "Encoder", "DEPEngine", "EngineConfig",
           "PersonalizationSettings", "Prepared", "Request", "Result", "BOUNDS", "SamplingSettings", "load_llm", "MODES",
           "PersonalContext", "ReviewStore"]
