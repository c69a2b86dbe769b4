"""clinbundle: train 3D segmentation models and ship them as parity-checked bundles.

Kept import-light on purpose: the servable model carries a copy of the runtime modules
(contract, inference, networks, errors) so that it loads where clinbundle is not installed.
"""

__version__ = "0.1.0"
