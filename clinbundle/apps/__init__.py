"""Interactive apps on top of the packaged models (the reviewer demo)."""
