from skuvision.finetune.groups import build_param_groups, stage_param_names
from skuvision.finetune.strategies import (
    Discriminative,
    FinetuneStrategy,
    FreezeStages,
    Full,
    Gradual,
    LinearProbe,
)

__all__ = [
    "Discriminative",
    "FinetuneStrategy",
    "FreezeStages",
    "Full",
    "Gradual",
    "LinearProbe",
    "build_param_groups",
    "stage_param_names",
]
