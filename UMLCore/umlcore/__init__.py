"""umlcore: Uncertainty-informed Mutual Learning (UML) for joint classification + segmentation.

A flat public API: the network and its config, the evidential maths and losses, model bundles.
"""

from .bundle import ModelBundle, ModelCard, InputSpec, MotionCorrection, Normalization, Segment, load_bundle, save_bundle
from .catalogue import list_models, resolve_model
from .config import UMLConfig
from .errors import BundleError, CancelledError, UMLError, UMLInputError
from .evidential import Opinion, alpha_from_logits, opinion, probability, uncertainty
from .losses import LossWeights, evidential_classification_loss, evidential_segmentation_loss, kl_annealing, uml_loss
from .network import UMLNet, UMLOutput
from . import metrics
from .synthetic import SyntheticCase, case_label, generate_case
from .io import read_case, read_volume, write_image_atomic
from .fusion import fuse_slice_opinions
from .predictor import Prediction, Predictor
from .reader import LesionReader, ReaderConfig
from .refiner import LesionRefiner, RefinerConfig

__version__ = "0.1.0"

__all__ = [
    "UMLConfig",
    "UMLNet",
    "UMLOutput",
    "Opinion",
    "opinion",
    "uncertainty",
    "probability",
    "alpha_from_logits",
    "LossWeights",
    "uml_loss",
    "kl_annealing",
    "evidential_classification_loss",
    "evidential_segmentation_loss",
    "ModelCard",
    "InputSpec",
    "MotionCorrection",
    "Normalization",
    "Segment",
    "ModelBundle",
    "save_bundle",
    "load_bundle",
    "list_models",
    "resolve_model",
    "UMLError",
    "UMLInputError",
    "BundleError",
    "CancelledError",
    "metrics",
    "SyntheticCase",
    "generate_case",
    "case_label",
    "read_volume",
    "read_case",
    "write_image_atomic",
    "fuse_slice_opinions",
    "Predictor",
    "Prediction",
    "LesionReader",
    "ReaderConfig",
    "LesionRefiner",
    "RefinerConfig",
    "__version__",
]
