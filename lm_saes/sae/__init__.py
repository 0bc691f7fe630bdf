"""SAE stage: the config, the model, and the activation-function registry."""

from lm_saes.sae.activation_functions import ACTIVATION_FUNCTIONS
from lm_saes.sae.config import SAEConfig
from lm_saes.sae.model import SAELoss, SparseAutoEncoder

__all__ = ["ACTIVATION_FUNCTIONS", "SAEConfig", "SAELoss", "SparseAutoEncoder"]
