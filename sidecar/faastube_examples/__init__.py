"""Shared helpers of the example workflows in ``examples/`` (backend choice, arrays, weights).

Installed with faastube so that an example's ``functions.py`` imports the same code in
local mode and in a function's image. NumPy only at import; torch and torchvision are
imported on first use, and only when the torch backend is chosen.
"""
