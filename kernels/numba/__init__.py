from normkit.contract import DIRECTIONS
from normkit.registry import Backend

backend = Backend(
    name="numba",
    module="normkit_kernels.numba.kernels",
    kernels=DIRECTIONS,
    description="Numba JIT, parallel=True; compiled per dtype on first use and cached on disk",
)
