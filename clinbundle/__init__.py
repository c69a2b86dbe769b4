"""clinbundle: train 3D segmentation models and ship them as parity-checked bundles.

Kept import-light on purpose: the servable model carries a copy of the runtime modules
(contract, inference, networks, errors) so that it loads where clinbundle is not installed.
"""

__version__ = "0.1.0"

from clinbundle.runtime.quiet_monai import hold_out_map_sdk

hold_out_map_sdk()  # `import monai` imports the MAP SDK (holoscan) only where a MAP needs it
