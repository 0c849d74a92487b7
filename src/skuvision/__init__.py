"""skuvision: product-image classification by transfer learning (Lightning + Hydra + timm)."""

from skuvision.config import register_resolvers

__version__ = "0.1.0"

register_resolvers()
