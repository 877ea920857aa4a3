"""One module per dictionary architecture; importing this package registers them all."""

from .autoencoder import AutoEncoder
from .identity import IdentityDict
from .stretcher import MLPStretcher

__all__ = ["AutoEncoder", "IdentityDict", "MLPStretcher"]
