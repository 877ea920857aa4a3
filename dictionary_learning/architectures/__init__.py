"""One module per dictionary architecture; importing this package registers them all."""

from .autoencoder import AutoEncoder
from .autoencoder_new import AutoEncoderNew
from .batch_topk import BatchTopKSAE
from .gated import GatedAutoEncoder
from .identity import IdentityDict
from .jumprelu import JumpReluAutoEncoder
from .matryoshka import MatryoshkaBatchTopKSAE
from .stretcher import MLPStretcher
from .token_normalized import TokenNormalizedSAE
from .topk import AutoEncoderTopK
from .transcoder import Transcoder

__all__ = ["AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE",
           "GatedAutoEncoder", "IdentityDict", "JumpReluAutoEncoder", "MLPStretcher",
           "MatryoshkaBatchTopKSAE",
           "TokenNormalizedSAE", "Transcoder"]
