"""The configs shipped with omnimoe (YAML files, one run each), installed with the package as
package data so that `omnimoe train NAME` finds them without the repository: a regular install, a
wheel or Colab (train/config_files.py resolves a name or a path to one of them)."""
