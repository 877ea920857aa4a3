"""dictionary_learning: train and evaluate sparse autoencoders ("dictionaries") on the
activations of HuggingFace language models, read and patched with nnsight.

    text -> ActivationBuffer -> trainSAE -> ae.pt + config.json -> evaluate / load_dictionary
    load_session(folder) -> (model, dictionary, buffer);  steering: edit features while generating
"""

from .buffer import ActivationBuffer
from .evaluation import evaluate, feature_frequency_histogram, loss_recovered, reconstruction_metrics
from .dictionary import (AutoEncoder, AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE, Dictionary,
                         GatedAutoEncoder, IdentityDict, JumpReluAutoEncoder,
                         MatryoshkaBatchTopKSAE, MLPStretcher)
from .loading import load_dictionary
from . import steering
from .session import load_session, load_setting
from .steering import Interventions
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
    "Interventions",
    "JumpReluAutoEncoder",
    "MatryoshkaBatchTopKSAE",
    "MLPStretcher",
    "Trainer",
    "TrainerConfig",
    "evaluate",
    "feature_frequency_histogram",
    "load_dictionary",
    "load_session",
    "load_setting",
    "loss_recovered",
    "reconstruction_metrics",
    "steering",
    "trainSAE",
    "train_dictionaries",
]
