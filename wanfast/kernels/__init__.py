"""Hand-written GPU kernels (Triton). Each module has a pure-torch reference of the same math for CPU tests."""
