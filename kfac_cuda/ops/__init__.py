"""The hot ops, each with a PyTorch reference and (when compiled) a CUDA kernel."""
from .conv_factor_accumulate import accumulate_conv_factor, conv_patches
from .factor_accumulate import accumulate_factor
from .precondition import precondition
from .scale_accumulate import accumulate_scale

__all__ = ["accumulate_factor", "accumulate_conv_factor", "conv_patches", "precondition", "accumulate_scale"]
