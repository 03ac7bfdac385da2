"""GN1/GN2-style jet taggers: dense nets, attention, transformer encoder, pooling, tasks.

Public API: `build_tagger(model_cfg, class_dict)` builds a `Tagger` from the `model` config
node; `label_specs` and `input_variables` tell the data loader what to read without building
the model.
"""

from salt.errors import ModelConfigError
from salt.models.attention import MultiheadAttention, resolve_heads
from salt.models.dense import Dense, count_parameters
from salt.models.pooling import CrossAttentionPooling, GlobalAttentionPooling
from salt.models.tagger import Tagger, build_tagger, input_variables, label_specs
from salt.models.tasks import ClassificationTask, RegressionTask, Task, VertexingTask
from salt.models.transformer import TransformerEncoder

__all__ = [
    "ClassificationTask",
    "CrossAttentionPooling",
    "Dense",
    "GlobalAttentionPooling",
    "ModelConfigError",
    "MultiheadAttention",
    "RegressionTask",
    "Tagger",
    "Task",
    "TransformerEncoder",
    "VertexingTask",
    "build_tagger",
    "count_parameters",
    "input_variables",
    "label_specs",
    "resolve_heads",
]
