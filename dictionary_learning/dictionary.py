"""Every dictionary class, importable from the place research code has always used.

Research code that imports ``AutoEncoder`` (or any other class) from this module keeps
working: the classes live one per module in ``architectures/`` and the interface in
``base.py``; this module gathers them.
"""

from .architectures import *  # noqa: F401,F403 - the public re-export is the point
from .architectures import __all__ as _architectures
from .base import (PENALTIES, Dictionary, LossContext, LossOutput, entropy_loss, l1_loss,
                   reconstruction_loss)

__all__ = ["Dictionary", "LossContext", "LossOutput", "PENALTIES", "entropy_loss", "l1_loss",
           "reconstruction_loss", *_architectures]
