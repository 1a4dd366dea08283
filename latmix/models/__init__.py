"""Per-architecture adapters, model loading and the outlier-injection reparametrization."""

from latmix.models.adapter import ADAPTERS, LINEAR_ROLES, LlamaFamilyAdapter, get_adapter
from latmix.models.loading import load_model
from latmix.models.outliers import inject_channel_outliers

__all__ = ["ADAPTERS", "LINEAR_ROLES", "LlamaFamilyAdapter", "get_adapter", "inject_channel_outliers", "load_model"]
