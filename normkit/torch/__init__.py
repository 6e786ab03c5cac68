"""PyTorch frontend (see issue: custom ops, modules, convert). Imported only when asked for."""
