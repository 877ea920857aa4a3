"""dictionary_learning: train and evaluate sparse autoencoders ("dictionaries") on the
activations of HuggingFace language models, read and patched with nnsight.

    text -> ActivationBuffer -> trainSAE -> ae.pt + config.json -> evaluate / load_dictionary
"""

from .buffer import ActivationBuffer
from .evaluation import evaluate, feature_frequency_histogram, loss_recovered, reconstruction_metrics
from .dictionary import (AutoEncoder, AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE, Dictionary,
                         GatedAutoEncoder, IdentityDict, JumpReluAutoEncoder,
                         MatryoshkaBatchTopKSAE, MLPStretcher)
from .loading import load_dictionary
from .trainer import Trainer, TrainerConfig
from .training import trainSAE, train_dictionaries

__all__ = [
    "ActivationBuffer",
    "AutoEncoder",
    "AutoEncoderNew",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "Dictionary",
    "GatedAutoEncoder",
    "IdentityDict",
    "JumpReluAutoEncoder",
    "MatryoshkaBatchTopKSAE",
    "MLPStretcher",
    "Trainer",
    "TrainerConfig",
    "evaluate",
    "feature_frequency_histogram",
    "load_dictionary",
    "loss_recovered",
    "reconstruction_metrics",
    "trainSAE",
    "train_dictionaries",
]
