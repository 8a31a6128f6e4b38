"""The version of slimtorch (``slimtorch.__version__``; every file slimtorch writes records it)."""

VERSION = "0.1.0"
