"""The MONAI Deploy application of a clinbundle MAP: DICOM or NIfTI in, segmentation out.

Run it the way the MAP runtime does: `python APP_DIR -i IN -o OUT -m MODELS` (or with
HOLOSCAN_INPUT_PATH / HOLOSCAN_OUTPUT_PATH / HOLOSCAN_MODEL_PATH set), where APP_DIR is the
build context's `app/` folder; from a source checkout `python -m clinbundle.apps.map_app`.
"""

from clinbundle.runtime.quiet_monai import raise_stack_limit

raise_stack_limit()  # before holoscan is imported (by .app): it checks the limit at import
