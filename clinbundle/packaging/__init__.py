"""Packaging: a registered model -> deployment formats, each proven equal to PyTorch.

    model_source (resolve --model, read the contract)  ->  export (ONNX)
    -> parity (the shared harness, every format)  ->  bundle (files, manifest, model card)

Every format reuses `model_source`, `runtimes` and `parity`; a format adds only its own files.
"""
