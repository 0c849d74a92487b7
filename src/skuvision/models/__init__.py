from skuvision.models.backbone import create_backbone
from skuvision.models.classifier import Classifier, load_classifier

__all__ = ["Classifier", "create_backbone", "load_classifier"]
