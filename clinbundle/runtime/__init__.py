"""The runtime core: the only clinbundle code a shipped model carries.

contract (what a model expects and returns), geometry (reorient/resample to the contract and
back), inference (the one sliding-window path), networks (MONAI classes by name), labels
(probabilities -> label maps, post-processing), runners (ONNX Runtime behind the one path),
bundle_reader (open and check an ONNX bundle), errors. The pyfunc, the bento and the MAP vendor
this package and nothing else of clinbundle's build or training code; `tests/test_layout.py`
holds it to importing only itself and third-party libraries.
"""
