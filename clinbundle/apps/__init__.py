"""Applications built on the packaged champion (the MONAI Deploy MAP app; later the demo)."""
