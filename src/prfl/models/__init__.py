"""Model zoo (VGG-11, LEAF CNN, MLP, char-LSTM), prunable-parameter selection and cost model."""

from prfl.models.cost import BACKWARD_FACTOR, LayerCost, ModelCost, model_cost
from prfl.models.errors import ModelError
from prfl.models.prunable import prunable_parameter_names
from prfl.models.zoo import MODELS, MLP, CharLSTM, ConvNet, build_model, scaled_width

__all__ = [
    "BACKWARD_FACTOR",
    "MODELS",
    "MLP",
    "CharLSTM",
    "ConvNet",
    "LayerCost",
    "ModelCost",
    "ModelError",
    "build_model",
    "model_cost",
    "prunable_parameter_names",
    "scaled_width",
]
