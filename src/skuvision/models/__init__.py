from skuvision.models.backbone import create_backbone
from skuvision.models.classifier import Classifier
from skuvision.models.input_config import resolve_input

__all__ = ["Classifier", "create_backbone", "resolve_input"]
