"""kfac_cuda: Kronecker-factored natural-gradient optimizers (K-FAC, EKFAC, TKFAC, TEKFAC)
for PyTorch, with fused CUDA kernels for the per-layer hot paths."""
from ._extension import cuda_extension_available, cuda_extension_error
from .batch_size import ExponentialBatchSize
from .comm import LocalComm
from .distributed import DistributedComm
from .optimizers import EKFAC, KFAC, TEKFAC, TKFAC
from .preconditioner import METHODS, Preconditioner
from .quadratic_model import QuadraticModel

__version__ = "0.1.0"

__all__ = ["KFAC", "EKFAC", "TKFAC", "TEKFAC", "Preconditioner", "QuadraticModel", "METHODS", "DistributedComm", "LocalComm",
           "ExponentialBatchSize",
           "cuda_extension_available", "cuda_extension_error", "__version__"]
