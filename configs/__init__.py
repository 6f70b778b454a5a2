"""The shipped configs (YAML), installed with the package so `omnimoe train NAME` finds them
without the repository (train/config_files.py)."""
