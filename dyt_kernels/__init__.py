"""dyt_kernels: fused Triton kernels for Dynamic Tanh (arXiv 2503.10622) and a drop-in nn.LayerNorm swap."""
from .backend import get_backend, use_backend
from .checkpoint import DyTCheckpointWarning, load_dyt_state_dict, load_pretrained_dyt
from .convert import ConversionReport, conversion_report, convert_layernorm_to_dyt
from .fold import FoldReport, fold_dyt_affine
from .functional import dyt, dyt_modulate, layernorm_modulate
from .modules import DyT, ModulatedDyT, dyt_parameter_names

__all__ = ["dyt", "DyT", "dyt_modulate", "ModulatedDyT", "layernorm_modulate", "convert_layernorm_to_dyt",
           "conversion_report", "ConversionReport", "load_dyt_state_dict", "load_pretrained_dyt",
           "DyTCheckpointWarning", "fold_dyt_affine", "FoldReport", "use_backend", "get_backend", "dyt_parameter_names"]
__version__ = "0.1.0"
