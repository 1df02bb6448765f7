"""umlcore: Uncertainty-informed Mutual Learning (UML) for joint classification + segmentation.

A flat public API: the network and its config, the evidential maths and losses, model cards and bundles, the
predictor, I/O, metrics and the synthetic data.
"""

from . import metrics
from .bundle import ModelBundle, load_bundle, save_bundle
from .card import InputSpec, ModelCard, MotionCorrection, Normalization, ReaderConfig, Segment
from .catalogue import list_models, resolve_model
from .config import UMLConfig
from .errors import BundleError, CancelledError, UMLError, UMLInputError
from .evidential import Opinion, alpha_from_logits, opinion, probability, uncertainty
from .fusion import case_opinion, fuse_slice_opinions
from .io import read_case, read_volume, write_image_atomic
from .losses import LossWeights, evidential_classification_loss, evidential_segmentation_loss, kl_annealing, uml_loss
from .network import UMLNet, UMLOutput
from .predictor import Prediction, Predictor
from .reader import LesionReader
from .synthetic import SyntheticCase, case_label, generate_case

__version__ = "0.2.0"

__all__ = [
    "UMLConfig", "UMLNet", "UMLOutput",
    "Opinion", "opinion", "uncertainty", "probability", "alpha_from_logits",
    "LossWeights", "uml_loss", "kl_annealing", "evidential_classification_loss", "evidential_segmentation_loss",
    "ModelCard", "InputSpec", "MotionCorrection", "Normalization", "ReaderConfig", "Segment",
    "ModelBundle", "save_bundle", "load_bundle", "list_models", "resolve_model",
    "UMLError", "UMLInputError", "BundleError", "CancelledError",
    "Predictor", "Prediction", "LesionReader", "case_opinion", "fuse_slice_opinions",
    "read_volume", "read_case", "write_image_atomic",
    "metrics", "SyntheticCase", "generate_case", "case_label",
    "__version__",
]
