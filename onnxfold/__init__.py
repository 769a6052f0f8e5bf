"""onnxfold: exact structural re-parameterization of ONNX graphs."""

from .errors import OnnxfoldError
from .optimize import optimize

__all__ = ["OnnxfoldError", "optimize"]
__version__ = "0.1.0"
