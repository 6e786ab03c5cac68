from normkit.contract import DIRECTIONS
from normkit.registry import Backend

backend = Backend(
    name="cython",
    module="normkit_kernels.cython.kernels",
    kernels=DIRECTIONS,
    description="Cython with OpenMP prange, compiled at install time",
)
