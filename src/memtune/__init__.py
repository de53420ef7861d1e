"""memtune: teach a language model new facts without forgetting.

Product-key memory layers retrofitted into Hugging Face decoder models, and sparse memory
finetuning (SMF) that updates only the memory slots the new data reads.
"""

from memtune.config import MemoryConfig
from memtune.memory import MemoryBank, ProductKeyMemory, ValueTable
from memtune.recipe import LearnResult, RecipeConfig, learn
from memtune.retrofit import (
    bypass_memory,
    freeze_base,
    get_memory_bank,
    is_memory_param,
    memory_parameters,
    retrofit,
)

__version__ = "0.1.0"

__all__ = [
    "LearnResult",
    "RecipeConfig",
    "learn",
    "MemoryBank",
    "MemoryConfig",
    "ProductKeyMemory",
    "ValueTable",
    "bypass_memory",
    "freeze_base",
    "get_memory_bank",
    "is_memory_param",
    "memory_parameters",
    "retrofit",
]
