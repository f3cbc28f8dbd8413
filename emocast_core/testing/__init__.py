"""Offline test material built in the real file formats (tiny models, synthetic inputs); used by tests and `selftest`."""
