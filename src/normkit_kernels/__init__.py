"""normkit's built-in backends. Each subpackage declares itself in ``__init__`` (light) and keeps its kernels in
a module that is imported only when first used; both register through the ``normkit.backends`` entry point."""
